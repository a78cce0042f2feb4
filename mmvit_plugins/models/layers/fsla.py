"""Feature-space local attention (FSLA) of BOAT, shared by BOAT-Swin and BOAT-CSWin.

Tokens are grouped by feature similarity with a balanced hierarchical 2-means on the queries,
attention runs inside each group (plus an overlap with the sibling group), and a depthwise 3x3
convolution over the values adds a positional term.

Any token count N works: with ``k = ceil(log2(N / m))`` levels there are ``G = 2**k`` groups.
The real tokens of a group split ``ceil/floor`` into its children, so the final groups hold
``floor(N / G)`` or ``ceil(N / G)`` real tokens each (never more than m, always more than
``m / 2 - 1``). The sequence is padded to ``G * ceil(N / G)`` slots (fewer than G padding
slots); padding sits behind the real tokens of its group, adds nothing to the centroids and is
masked out of every softmax. Where ``N = m * 2**k`` there is no padding and the result is the
one of the public code. With ``N <= m`` all tokens of an image form one group (plain
attention). Everything is batched over images and heads; images never interact.
"""
import math
from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class _Level(NamedTuple):
    """One split of ``g`` groups of ``n`` slots into ``2g`` groups of ``n / 2`` slots."""
    real: torch.Tensor          # (g, n) bool: slot holds a real token
    halves: torch.Tensor        # (g, 2, n): indicators of the first half and of the whole group
    child_slots: torch.Tensor   # (g, n): sorted position that fills each child slot
    has_padding: bool


class GroupLayout(NamedTuple):
    """Where real tokens and padding sit at every level; depends only on (N, m, overlap)."""
    slot_size: int                        # s = ceil(N / G) <= m slots per final group
    num_slots: int                        # P = G * s
    levels: Tuple[_Level, ...]
    key_slots: torch.Tensor               # (G * (s + o),) slot of each key of each group
    key_padding: Optional[torch.Tensor]   # (G, 1, s + o) bool, True = padding; or None


@lru_cache(maxsize=64)
def group_layout(num_tokens: int, group_size: int, overlap: int,
                 device: torch.device = torch.device('cpu')) -> GroupLayout:
    """The deterministic layout of ``num_tokens > group_size`` tokens in balanced groups.

    ``G = 2**ceil(log2(N / m))`` groups. A group never holds more than ``s = ceil(N / G)`` real
    tokens, so ``s`` slots per final group suffice (``s == m`` when ``N == m * G``); fewer slots
    change nothing but the amount of padding.
    """
    num_levels = math.ceil(math.log2(num_tokens / group_size))
    num_groups = 1 << num_levels
    slot_size = -(-num_tokens // num_groups)
    num_slots = slot_size * num_groups
    counts = torch.tensor([num_tokens])
    levels = []
    for level in range(num_levels):
        n = num_slots >> level
        half = n // 2
        pos = torch.arange(n)
        first, second = (counts + 1) // 2, counts // 2
        real = pos < counts[:, None]
        halves = torch.stack([pos < first[:, None], real], dim=1).float()
        # Sorted order of a group: its real tokens by key, then its padding. Child 0 takes the
        # first `first` real tokens, child 1 the rest; each fills up with padding slots.
        j = torch.arange(half)
        child0 = torch.where(j < first[:, None], j, counts[:, None] + j - first[:, None])
        child1 = torch.where(j < second[:, None], first[:, None] + j,
                             counts[:, None] + half - first[:, None] + j - second[:, None])
        levels.append(_Level(real.to(device), halves.to(device),
                             torch.cat([child0, child1], dim=1).to(device),
                             bool((counts < n).any())))
        counts = torch.stack([first, second], dim=1).flatten()

    overlap = min(overlap, slot_size)
    group = torch.arange(num_groups)[:, None]
    sibling = group ^ 1
    sibling_count = counts[sibling]
    # Group 2i takes the first `overlap` tokens of group 2i+1, group 2i+1 the last real ones of 2i.
    start = torch.where(group % 2 == 0, torch.zeros_like(sibling_count),
                        (sibling_count - overlap).clamp(min=0))
    overlap_pos = start + torch.arange(overlap)
    own_pos = torch.arange(slot_size).expand(num_groups, -1)
    key_slots = torch.cat([group * slot_size + own_pos, sibling * slot_size + overlap_pos], 1)
    key_padding = torch.cat([own_pos >= counts[:, None], overlap_pos >= sibling_count], 1)
    return GroupLayout(slot_size, num_slots, tuple(levels), key_slots.flatten().to(device),
                       key_padding[:, None].to(device) if key_padding.any() else None)


def _flat_index(index: torch.Tensor, row_length: int) -> torch.Tensor:
    """(R, k) indices into R rows of ``row_length`` -> (R * k,) indices into the stacked rows."""
    offsets = torch.arange(index.shape[0], device=index.device) * row_length
    return (index + offsets[:, None]).flatten()


@torch.no_grad()
def balanced_clustering(x: torch.Tensor, layout: GroupLayout, iters: int = 2,
                        sharpness: float = 100.) -> torch.Tensor:
    """Balanced hierarchical 2-means of the rows of every (N, d) matrix in ``x``.

    Each split: centroids start as the sums of the first and second half of the group's real
    tokens, then ``iters`` times: cosine scores, soft assignment
    ``softmax(sharpness * scores)`` over the two centroids, centroids = assignment-weighted sums
    of the raw tokens; centroids are L2-normalised. Tokens are ordered by
    ``(s0 + 1) / (s1 + 1)`` and the first half (rounded up) goes to child 0.

    Padding slots hold zero vectors, so they add nothing to any centroid, and their keys are
    +inf, so they sort behind the real tokens. With two centroids the softmax is a sigmoid of
    the score difference, and the second centroid's sum is the group sum minus the first's.

    Args:
        x: (R, N, d) features (one matrix per image and head).
        layout: :func:`group_layout` of (N, m, overlap).
        iters: refinement iterations per split; sharpness: soft-assignment inverse temperature.

    Returns:
        (R, P) long: token index of every slot in group order (G groups of m slots); indices
        ``>= N`` are padding.
    """
    rows, num_tokens, dim = x.shape
    x = F.pad(x, (0, 0, 0, layout.num_slots - num_tokens))
    inv_norm = x.norm(dim=-1).clamp_min(1e-12).reciprocal().flatten()
    order = torch.arange(layout.num_slots, device=x.device).expand(rows, -1)
    feats, feats_inv_norm = x.unsqueeze(1), inv_norm.view(rows, 1, 1, -1)
    for depth, level in enumerate(layout.levels):
        groups, n = level.real.shape
        first, total = (level.halves.to(x.dtype) @ feats).split(1, dim=-2)  # (R, g, 1, d)
        # scores are computed as (R, g, k, n) = centroids @ feats^T: row-vector products are
        # much faster than matrix-vector ones on CPU
        tokens = feats.transpose(-1, -2)
        for step in range(iters + 1):
            centroids = F.normalize(torch.cat([first, total - first], dim=-2), dim=-1)
            if step == iters:
                break
            diff = (centroids[..., :1, :] - centroids[..., 1:, :]) @ tokens
            first = torch.sigmoid(sharpness * diff * feats_inv_norm) @ feats
        scores = (centroids @ tokens) * feats_inv_norm
        key = (scores[..., 0, :] + 1) / (scores[..., 1, :] + 1)
        if level.has_padding:
            key = key.masked_fill(~level.real, float('inf'))
        within = key.argsort(dim=-1).gather(-1, level.child_slots.expand(rows, -1, -1))
        order = order.view(rows, groups, n).gather(-1, within).view(rows, 2 * groups, n // 2)
        if depth == len(layout.levels) - 1:
            break
        # children are permutations inside their parent's span: gathering from the previous
        # level's features keeps the reads local (cache-friendly), unlike reads in token order
        index = _flat_index(within.view(rows * groups, n), n)
        feats = feats.reshape(-1, dim).index_select(0, index).view(rows, 2 * groups, n // 2, dim)
        feats_inv_norm = feats_inv_norm.reshape(-1).index_select(0, index).view(
            rows, 2 * groups, 1, n // 2)
    return order.reshape(rows, -1)


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
    """

    def __init__(self, dim: int, num_heads: int, group_size: int = 49, overlap: int = 20,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.):
        super().__init__()
        if group_size < 2:
            raise ValueError(f'group_size={group_size} is invalid; allowed values: ints >= 2')
        if not 0 <= overlap <= group_size:
            raise ValueError(f'overlap={overlap} is invalid; allowed values: 0..{group_size} '
                             '(at most group_size)')
        self.num_heads = num_heads
        self.group_size = group_size
        self.overlap = overlap
        self.scale = (dim // num_heads) ** -0.5 if qk_scale is None else qk_scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw_shape
        qkv = self.qkv(x)
        if n <= self.group_size:
            q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, n, c)
        else:
            out = self._grouped_attention(qkv)
        v_map = qkv[..., 2 * c:].transpose(1, 2).reshape(b, c, h, w)
        out = out + self.lepe(v_map).flatten(2).transpose(1, 2)
        return self.proj_drop(self.proj(out))

    def _grouped_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, 3C) projections -> (B, N, C) attention inside the balanced groups.

        q, k and v of every slot are gathered straight from the projection's rows (one row per
        token, q/k/v and head); padding slots point at a real token: as keys they are masked,
        as queries their outputs are never read back.
        """
        b, n, c3 = qkv.shape
        heads = self.num_heads
        d = c3 // (3 * heads)
        q = qkv.view(b, n, 3, heads, d)[:, :, 0].transpose(1, 2).reshape(b * heads, n, d)
        layout = group_layout(n, self.group_size, self.overlap, qkv.device)
        rows, slots = b * heads, layout.num_slots
        order = balanced_clustering(q.detach(), layout)  # (rows, slots) token of each slot

        row = torch.arange(rows, device=qkv.device)[:, None]
        q_row = ((row // heads * n + order.clamp(max=n - 1)) * 3) * heads + row % heads
        k_row = q_row[:, layout.key_slots] + heads
        source = qkv.reshape(-1, d)
        groups = slots // layout.slot_size
        q_g = source.index_select(0, q_row.flatten()).view(rows, groups, -1, d)
        k_g = source.index_select(0, k_row.flatten()).view(rows, groups, -1, d)
        v_g = source.index_select(0, (k_row + heads).flatten()).view(rows, groups, -1, d)
        mask = None
        if layout.key_padding is not None:
            # every group has real keys, so no softmax row is fully masked; a mask expanded to
            # the full (rows, G, s, s + o) shape lets SDPA take its fused CPU kernel
            mask = torch.zeros(layout.key_padding.shape, dtype=q_g.dtype, device=q_g.device)
            mask = mask.masked_fill_(layout.key_padding, float('-inf')).expand(
                rows, -1, q_g.shape[-2], -1)
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, scale=self.scale)

        # the slot of every real token (padding slots all land in the dropped column n)
        slot_of_token = torch.empty(rows, n + 1, dtype=torch.long, device=qkv.device)
        slot_of_token.scatter_(1, order.clamp(max=n),
                               torch.arange(slots, device=qkv.device).expand(rows, -1))
        out_row = (slot_of_token[:, :n] + row * slots).view(b, heads, n).transpose(1, 2)
        return out.reshape(-1, d).index_select(0, out_row.flatten()).view(b, n, heads * d)


__all__: List[str] = ['FeatureSpaceLocalAttention', 'balanced_clustering', 'group_layout',
                      'GroupLayout']
