"""Feature-space local attention (FSLA) of BOAT, shared by BOAT-Swin and BOAT-CSWin.

Tokens are grouped by feature similarity with a balanced hierarchical 2-means on the queries,
attention runs inside each group (plus an overlap with the sibling group), and a depthwise 3x3
convolution over the values adds a positional term.

Any token count N works: with ``k = ceil(log2(N / m))`` levels there are ``G = 2**k`` groups.
The real tokens of a group split ``ceil/floor`` into its children, so the final groups hold
``floor(N / G)`` or ``ceil(N / G)`` real tokens each (never more than m, always more than
``m / 2 - 1``). Where ``N = m * 2**k`` the result is the one of the public code. With
``N <= m`` all tokens of an image form one group (plain attention). Everything is batched over
images and heads; images never interact.

Static shapes: the clustering works on ``P = G * m`` slots (m per final group), so the shapes of
every tensor it makes depend only on (rows, G, m, d); where the real tokens and the padding sit
is data of fixed shape (:class:`GroupLayout`), so one compiled or captured graph of
:func:`cluster_slots` serves every N with the same number of levels. Padding slots hold zero
features: they add nothing to any centroid and sort behind the real tokens. On CPU, where that
padding (up to N slots) costs time and no graph is captured, the same code runs on
``s = ceil(N / G)`` slots per group by default (``static_shapes``; the groups are the same). The
attention runs on s query slots per group, the real tokens of each group and fewer than G
padding slots in all, which are masked out as keys and never read back as queries.

The clustering runs with autocast off, whatever the compute dtype (bf16 sort keys would take
hundreds of distinct values for thousands of tokens): in float32 on the CPU and MPS, in float64
for float64 inputs and on other devices (GPUs). There its products (scores against the
centroids, centroid sums) keep full precision whatever ``torch.backends.cuda.matmul.allow_tf32``
or ``torch.set_float32_matmul_precision`` say: TF32 products (10-bit mantissa), which the
assignment's sharpness of 100 amplifies, move many tokens to other groups than the float32 or
float64 clustering (docs/training.md). The cost: the clustered features (no gradient, freed
after the clustering) take twice the memory, and the products with two centroids run in float64.
"""
from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .attention import ScaledDotProductAttention
from .policy import (
    Size,
    autocast_off,
    capturing,
    clustering_dtype,
    is_concrete,
    static_group_layout,
)
from .shapes import size_cache

# Added to every centroid sum so that its norm is never zero (its square is a normal float32).
_CENTROID_EPS = 1e-18


class ClusterShape(NamedTuple):
    """The static part of a layout: every shape of the clustering follows from (G, slots per
    group), the group size m with static shapes (else ``ceil(N / G)``)."""
    num_groups: int   # G = 2**k
    group_slots: int  # slots per final group
    num_slots: int    # P = G * group_slots
    num_levels: int   # k


class GroupLayout(NamedTuple):
    """Where N real tokens and the padding sit, for the clustering (fixed-shape data of a
    :class:`ClusterShape`) and for the attention (``s = ceil(N / G)`` query slots per group)."""
    shape: ClusterShape
    num_tokens: int                       # N
    first_slot: int                       # slots first_slot .. first_slot + N - 1 hold tokens
    child_slots: torch.Tensor             # (k, P) int32: sorted position behind every slot
    slot_meta: torch.Tensor               # (P, 3) float32: 1, padding flag, token (N = padding)
    slot_tokens: torch.Tensor             # (P,) long: the token of every slot (N = padding)
    num_groups: int                       # G
    slot_size: int                        # s = ceil(N / G) query slots per group
    num_slots: int                        # G * s
    key_slots: torch.Tensor               # (G * (s + o),) clustering slot of every key
    query_slots: torch.Tensor             # (s * G,) clustering slot of every query, slot-major
    key_padding: Optional[torch.Tensor]   # (G, 1, s + o) bool, True = padding; or None


def num_levels(num_tokens: Size, group_size: int) -> int:
    """k = ceil(log2(N / m)) (0 for N <= m): the smallest k with ``m * 2**k >= N``.

    Found by comparing sizes, so that a compiled graph with dynamic shapes guards on k rather
    than N, and an exported graph keeps the k of its export size: it serves the token counts
    in ``(m * 2**(k-1), m * 2**k]``.
    """
    k = 0
    while group_size << k < num_tokens:
        k += 1
    return k


@lru_cache(maxsize=16)
def _count_offsets(num_levels: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Per level l = 0..k, the (2**l,) r with the real tokens of group g at level l
    ``(N + r[g]) // 2**l``: a ceil/floor split gives child 0 ``(c + 1) // 2`` and child 1
    ``c // 2``, i.e. offsets ``r + 2**l`` and ``r``."""
    rows = [torch.zeros(1, dtype=torch.long, device=device)]
    for level in range(num_levels):
        rows.append(torch.stack([rows[-1] + (1 << level), rows[-1]], 1).flatten())
    return tuple(rows)


def _level_counts(num_tokens: Size, levels: int, device: torch.device) -> List[torch.Tensor]:
    """Real tokens of every group at levels 0..k: each group splits ceil/floor, the first child
    taking the larger half."""
    return [(offsets + num_tokens) // (1 << level)
            for level, offsets in enumerate(_count_offsets(levels, device))]


def _child_slots(shares: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(P,) sorted position (within its row) behind every slot after one split.

    ``shares`` (g, r): real tokens of the r equal regions that each group's slots are laid out
    in, in sorted order (four: the halves of both children, which the next level's centroids
    start from; two: both final groups). Each region holds its tokens at its front; padding
    slots point at the group's last sorted position, which is padding whenever there is any.
    """
    groups, regions = shares.shape
    n = num_slots // groups
    first = torch.arange(0, num_slots, n, device=shares.device)[:, None, None]  # group starts
    start = (shares.cumsum(1) - shares)[..., None] + first
    pos = torch.arange(n // regions, device=shares.device)
    return torch.where(pos < shares[..., None], start + pos, first + (n - 1)).flatten()


def build_group_layout(num_tokens: Size, group_size: int, overlap: int,
                       device: torch.device = torch.device('cpu'),
                       static_shapes: bool = True) -> GroupLayout:
    """The deterministic layout of ``num_tokens > group_size`` tokens in balanced groups.

    ``G = 2**ceil(log2(N / m))`` groups; a group never holds more than ``s = ceil(N / G)`` real
    tokens, so ``s`` query slots per group suffice for the attention. The clustering works on
    m slots per group (``static_shapes``: its shapes are those of every N with G groups) or on s
    (less padding, less work; shapes that depend on N).

    ``num_tokens`` may be an int, a SymInt or a 0-d tensor (a traced size): all the layout's
    data is then computed from it with tensor operations; only the number of levels is a
    Python int. :func:`group_layout` is the cached version for int sizes.
    """
    if num_tokens <= group_size:
        raise ValueError(f'num_tokens={num_tokens} is invalid; allowed values: ints > '
                         f'group_size={group_size} (fewer tokens form one group)')
    levels = num_levels(num_tokens, group_size)
    num_groups = 1 << levels
    slot_size = (num_tokens + num_groups - 1) // num_groups
    group_slots = group_size if static_shapes else slot_size
    shape = ClusterShape(num_groups, group_slots, num_groups * group_slots, levels)
    num_slots = shape.num_slots

    counts = _level_counts(num_tokens, levels, device)
    child_slots = torch.stack([
        _child_slots(counts[min(level + 2, levels)].view(1 << level, -1), num_slots)
        for level in range(levels)])
    # level 0: token t in slot first_slot + t puts the first ceil(N / 2) tokens into the first
    # half of the slots and the rest into the second, the halves its centroids start from
    first_slot = num_slots // 2 - (num_tokens + 1) // 2
    token = torch.arange(num_slots, device=device) - first_slot
    padding = (token < 0) | (token >= num_tokens)
    token = token + padding * (num_tokens - token)  # padding slots hold N
    if isinstance(num_tokens, torch.Tensor):
        # A traced (exported) graph keeps this k for every N. More tokens than its range holds
        # fail in the clustering's gathers; fewer would form wrong groups silently, so they
        # point every slot past the tokens: the runtime stops with an out-of-bounds gather.
        token = token + (num_tokens <= group_size << (levels - 1)) * (num_tokens + 1)
    slot_meta = torch.stack([torch.ones_like(token), padding, token], dim=1).float()

    counts = counts[-1]
    concrete = is_concrete(num_tokens)
    # more overlap keys than a sibling holds are masked: the same result as fewer keys
    if concrete:
        overlap = min(overlap, slot_size)
    group = torch.arange(num_groups, device=device)[:, None]
    sibling = group ^ 1
    sibling_count = counts[sibling]
    # Group 2i takes the first `overlap` tokens of group 2i+1, group 2i+1 the last real ones of 2i.
    start = torch.where(group % 2 == 0, 0, (sibling_count - overlap).clamp(min=0))
    overlap_pos = start + torch.arange(overlap, device=device)
    own_pos = torch.arange(slot_size, device=device).expand(num_groups, -1)
    key_padding = torch.cat([own_pos >= counts[:, None], overlap_pos >= sibling_count], 1)
    key_slots = torch.cat([own_pos, overlap_pos + (sibling - group) * group_slots], 1)
    # padding keys read the group's first token (always real), so that every key is a token;
    # the mask removes them
    key_slots = key_slots.masked_fill(key_padding, 0) + group * group_slots
    # with N % G == 0 every group is full: nothing to mask (known only for an int N)
    unmasked = concrete and num_tokens % num_groups == 0
    # queries in the (s, G) order of fused SDPA outputs' memory
    query_slots = (own_pos.t() + group.t() * group_slots).flatten()
    return GroupLayout(shape, num_tokens, first_slot, child_slots.int(), slot_meta, token,
                       num_groups, slot_size, num_groups * slot_size, key_slots.flatten(),
                       query_slots, None if unmasked else key_padding[:, None])


group_layout = size_cache(maxsize=64)(build_group_layout)


@lru_cache(maxsize=16)
def _score_tail(sharpness: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 2): what the two centroid rows of a split carry after their ``sharpness``-scaled
    unit vector, against the slots' ``[1, padding]`` columns. Real tokens score
    ``sharpness * (s_j + 1)``; padding scores ``(sharpness + big, sharpness)``, so that it takes
    no weight and sorts behind the real tokens."""
    tail = torch.full((2, 2), sharpness, dtype=dtype, device=device)
    tail[0, 1] = torch.finfo(dtype).max / 16
    tail[1, 1] = 0.
    return tail


@lru_cache(maxsize=16)
def _half_pattern(half: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 2 * half): ones then zeros, and zeros then ones."""
    first = torch.arange(2 * half, device=device) < half
    return torch.stack([first, ~first]).to(dtype)


def _halves(num_slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 2, n) indicators of the first and the second half of a group's n slots: a view of a
    pattern cached for a power of two, so that few patterns serve all sizes."""
    half = num_slots // 2
    size = 1
    while size < half:
        size <<= 1
    return _half_pattern(size, dtype, device)[None, :, size - half:size + half]


@lru_cache(maxsize=16)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)


@size_cache(maxsize=64)
def _gather_offsets(rows: int, shape: ClusterShape, device: torch.device) -> torch.Tensor:
    """Start of every group's slots in the flattened (rows * P) features, for the smallest
    groups that are ever gathered (4m slots); coarser levels take every 2**i-th entry."""
    return torch.arange(0, rows * shape.num_slots, 4 * shape.group_slots, device=device)


def slot_features(x: torch.Tensor, layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """(..., N, d) features -> the slot features of :func:`cluster_slots`, in
    :func:`clustering_dtype`: (R, P, d) raw features (zero for padding) and (R, P, d + 3) scored
    features: unit features, 1, the padding flag and the slot's token (N for padding).

    This is the only step whose work depends on N; its outputs have the static shapes of
    ``layout.shape``.
    """
    num_tokens, dim = x.shape[-2:]
    if is_concrete(num_tokens) and num_tokens != layout.num_tokens:
        raise ValueError(f'x has {num_tokens} tokens, the layout is for {layout.num_tokens}')
    dtype = clustering_dtype(x)
    # padding slots read a zero token N
    tokens = torch.cat([x.to(dtype), x.new_zeros(*x.shape[:-2], 1, dim, dtype=dtype)], -2)
    raw = tokens.view(-1, num_tokens + 1, dim).index_select(1, layout.slot_tokens)
    norm = torch.linalg.vector_norm(raw, dim=-1, keepdim=True).clamp_min_(1e-12)
    meta = layout.slot_meta.expand(raw.shape[0], -1, -1)
    return raw, torch.cat([raw / norm, meta], -1)


def cluster_slots(raw: torch.Tensor, scored: torch.Tensor, child_slots: torch.Tensor,
                  shape: ClusterShape, iters: int = 2, sharpness: float = 100.) -> torch.Tensor:
    """Balanced hierarchical 2-means of the slots of :func:`slot_features`; static shapes.

    Each split of a group: centroids start as the sums of its two halves (the two halves of its
    real tokens in the current order; padding adds zeros), then ``iters`` times: cosine scores,
    soft assignment ``softmax(sharpness * scores)`` over the two centroids, centroids =
    assignment-weighted sums of the raw tokens. Tokens are ordered by
    ``(s0 + 1) / (s1 + 1)``; the first half of the real tokens (rounded up) goes to child 0, and
    ``child_slots`` lays the children out in the halves the next level starts from.

    One matmul per iteration scores the slots against both centroids, adding what the slots'
    ``+1`` and padding flag score (:func:`_score_tail`, once per level).

    Args:
        raw, scored: (R, P, d) and (R, P, d + 3) slot features.
        child_slots: (k, P) int32 of the :class:`GroupLayout`.

    Returns:
        (R, G, m) long: the token in every slot, real tokens at the front of their group, in
        key order; padding slots hold N.
    """
    rows, dim = raw.shape[0], raw.shape[-1]
    num_slots, m = shape.num_slots, shape.group_slots
    dtype, device = raw.dtype, raw.device
    eps = _scalar(_CENTROID_EPS, dtype, device)
    tail = _score_tail(sharpness, dtype, device)
    offsets = _gather_offsets(rows, shape, device)
    for level in range(shape.num_levels):
        groups = 1 << level
        n = num_slots // groups
        group_raw = raw.view(rows * groups, n, dim)
        group_scored = scored.view(rows * groups, n, dim + 3)
        unit_feats = group_scored[..., :dim].transpose(1, 2)
        # (R * g, 2, n) what the slots score besides the centroid term: their 1 and padding
        tail_scores = torch.matmul(tail, group_scored[..., dim:-1].transpose(1, 2))
        halves = _halves(n, dtype, device).expand(rows * groups, -1, -1)
        sums = torch.baddbmm(eps, halves, group_raw)
        for i in range(iters + 1):
            unit = sums / torch.linalg.vector_norm(sums, dim=-1, keepdim=True)
            scores = torch.baddbmm(tail_scores, unit, unit_feats, alpha=sharpness)
            if i < iters:
                sums = torch.baddbmm(eps, scores.softmax(dim=1), group_raw)
        # stable: equal keys (identical tokens, e.g. of a constant image region) keep their
        # order, as in ONNX's TopK, so exported graphs form the same groups
        within = (scores[:, 0] / scores[:, 1]).argsort(dim=-1, stable=True)
        within = within.view(rows, num_slots).index_select(1, child_slots[level])
        if level == shape.num_levels - 1:
            token = group_scored[..., -1].gather(1, within.view(rows * groups, n))
            return token.long().view(rows, shape.num_groups, m)
        # the groups of the next level are contiguous runs of slots: row gathers
        # every (n // 4m)-th offset, n // 4m = G / 2**(level + 2): in ints, m may be symbolic
        step = shape.num_groups >> (level + 2)
        index = (within.view(rows * groups, n) + offsets[::step, None]).view(-1)
        raw = raw.view(-1, dim).index_select(0, index)
        scored = scored.view(-1, dim + 3).index_select(0, index)
    raise AssertionError('unreachable: a layout has at least one level')


@torch.no_grad()
def balanced_clustering(x: torch.Tensor, layout: GroupLayout, iters: int = 2,
                        sharpness: float = 100.) -> torch.Tensor:
    """Balanced hierarchical 2-means of the rows of every (N, d) matrix in ``x``, in
    :func:`clustering_dtype` whatever the autocast state.

    Args:
        x: (..., N, d) features (one matrix per image and head; any strides and dtype).
        layout: :func:`group_layout` of (N, m, overlap).
        iters: refinement iterations per split; sharpness: soft-assignment inverse temperature.

    Returns:
        (R, G * m) long, R = the product of the leading dims: the token of every slot in group
        order (G groups of m slots, real tokens first); padding slots hold N.
    """
    with autocast_off(x.device):
        order = cluster_slots(*slot_features(x, layout), layout.child_slots, layout.shape,
                              iters, sharpness)
    return order.view(order.shape[0], -1)


class BalancedClustering(nn.Module):
    """:func:`balanced_clustering` as a module without parameters: (..., N, d) features and their
    :class:`GroupLayout` -> (R, G * m) long, the token of every slot in group order.

    Forward hooks on it see the groups of every forward (the final group of a token at slot p
    is ``p // layout.shape.group_slots``; its group at level l < k is that index ``>> (k - l)``,
    since every split lays its two children out in the two halves of its slots).
    """

    def __init__(self, iters: int = 2, sharpness: float = 100.):
        super().__init__()
        self.iters = iters
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        return balanced_clustering(x, layout, self.iters, self.sharpness)


@lru_cache(maxsize=64)
def _attention_mask(num_tokens: int, group_size: int, overlap: int,
                    device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(G, 1, s + o) additive key mask in the compute dtype, or None: a finite minimum, so that
    no fp16/bf16 arithmetic on it makes a NaN (every group has real keys)."""
    # the attention side of a layout is the same with static shapes or without
    return _additive_mask(group_layout(num_tokens, group_size, overlap, device, False).key_padding,
                          dtype)


def _key_mask(layout: GroupLayout, group_size: int, overlap: int,
              dtype: torch.dtype) -> Optional[torch.Tensor]:
    """:func:`_attention_mask` of a layout: cached for an int size in eager code, else
    computed in the graph."""
    if capturing() or not is_concrete(layout.num_tokens):
        return _additive_mask(layout.key_padding, dtype)
    return _attention_mask(layout.num_tokens, group_size, overlap, layout.key_slots.device,
                           dtype)


def _additive_mask(padding: Optional[torch.Tensor],
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    if padding is None:
        return None
    return torch.zeros((), dtype=dtype, device=padding.device).masked_fill(
        padding, torch.finfo(dtype).min)


@size_cache(maxsize=64)
def _row_offsets(batch: int, heads: int, num_tokens: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (image, head) row r: (R, 1, 3) rows of its q, k and v of token 0 in the (B * N * 3 *
    heads, d) projection, and (R, 1) its row for token 0 in a (B, N + 1, heads, d) output
    whose token N takes what padding slots compute."""
    row = torch.arange(batch * heads, device=device)
    image, head = row // heads, row % heads
    qkv = image * (num_tokens * 3 * heads) + head
    qkv = qkv[:, None, None] + torch.arange(3, device=device)[None, None] * heads
    out = (image * ((num_tokens + 1) * heads) + head)[:, None]
    return qkv, out


class FeatureSpaceLocalAttention(nn.Module):
    """BOAT's FSLA: attention inside balanced feature-space clusters, plus a depthwise-conv term.

    Input (B, N, C) tokens of an H x W map (N = H * W), output (B, N, C). Keys: ``qkv``,
    ``proj`` and ``lepe`` (the depthwise 3x3 convolution over the values).

    Args:
        dim: channels C; num_heads: heads (each clustered on its own).
        group_size: m, tokens per group (BOAT: window_size ** 2 = 49).
        overlap: keys each group borrows from its sibling group (BOAT: 20); at most m.
        qk_scale: attention scale; ``None`` is head_dim ** -0.5. The public BOAT-CSWin
            checkpoints were trained with 1.0.
        static_shapes: cluster on m slots per group (shapes that depend only on the number of
            groups, for compiled or captured graphs) or on ``ceil(N / G)`` (less padding, less
            work). Same result; ``None``: static everywhere but on CPU.
    """

    def __init__(self, dim: int, num_heads: int, group_size: int = 49, overlap: int = 20,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0., static_shapes: Optional[bool] = None):
        super().__init__()
        if group_size < 2:
            raise ValueError(f'group_size={group_size} is invalid; allowed values: ints >= 2')
        if not 0 <= overlap <= group_size:
            raise ValueError(f'overlap={overlap} is invalid; allowed values: 0..{group_size} '
                             '(at most group_size)')
        self.num_heads = num_heads
        self.group_size = group_size
        self.overlap = overlap
        self.static_shapes = static_shapes
        self.scale = (dim // num_heads) ** -0.5 if qk_scale is None else qk_scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.clustering = BalancedClustering()
        self.sdpa = ScaledDotProductAttention()
        self.lepe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        if n <= self.group_size:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            out = self.sdpa(q, k, v, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, n, c)
        else:
            out = self._grouped_attention(qkv)
        # the values in channels-last layout, where the convolution's output is (B, N, C) memory
        v_map = qkv[:, :, 2].reshape(b, *hw_shape, c).permute(0, 3, 1, 2)
        v_map = v_map.contiguous(memory_format=torch.channels_last)
        out = out + self.lepe(v_map).permute(0, 2, 3, 1).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def _grouped_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, heads, d) projections -> (B, N, C) attention inside the balanced groups.

        q, k and v of every key slot are gathered in one go from the projection's rows; padding
        key slots read a real token and are masked; padding query slots write to a token N that
        is dropped.
        """
        b, n, _, heads, d = qkv.shape
        rows = b * heads
        static = self.static_shapes
        if static is None:
            static = static_group_layout(qkv.device)
        # the tight layout's shapes follow N's value
        static = static or not is_concrete(n)
        layout = group_layout(n, self.group_size, self.overlap, qkv.device, static)
        groups, slot_size = layout.num_groups, layout.slot_size
        order = self.clustering(qkv[:, :, 0].transpose(1, 2), layout)  # (rows, G * m)

        qkv_rows, out_rows = _row_offsets(b, heads, n, qkv.device)
        key_token = order.index_select(1, layout.key_slots)
        index = torch.add(qkv_rows, key_token[..., None], alpha=3 * heads)
        qkv_g = qkv.view(-1, d).index_select(0, index.view(-1)).view(rows, groups, -1, 3, d)
        q_g, k_g, v_g = qkv_g[:, :, :slot_size, 0], qkv_g[..., 1, :], qkv_g[..., 2, :]
        mask = _key_mask(layout, self.group_size, self.overlap, qkv.dtype)
        if mask is not None:
            # an expanded mask of the full (rows, G, s, s + o) shape takes SDPA's fused kernel
            mask = mask.expand(rows, -1, slot_size, -1)
        out = self.sdpa(q_g, k_g, v_g, attn_mask=mask, scale=self.scale)

        # fused SDPA kernels write (rows, s, G, d) memory: copy its rows to their tokens
        query_token = order.index_select(1, layout.query_slots)  # (rows, s * G)
        out_row = torch.add(out_rows, query_token, alpha=heads).view(-1)
        out_full = out.new_empty(b * (n + 1) * heads, d)
        out_full.index_copy_(0, out_row, out.transpose(1, 2).reshape(rows * slot_size * groups, d))
        return out_full.view(b, n + 1, heads * d)[:, :n]


__all__: List[str] = ['BalancedClustering', 'ClusterShape', 'FeatureSpaceLocalAttention',
                      'GroupLayout', 'balanced_clustering', 'build_group_layout',
                      'cluster_slots', 'clustering_dtype', 'group_layout', 'num_levels',
                      'slot_features']
