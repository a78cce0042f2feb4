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
    padding: Optional[torch.Tensor]      # (g, n) bool: slot holds padding; None if none does
    halves: torch.Tensor                 # (g, 2, n): indicators of the two halves' real tokens
    child_slots: Optional[torch.Tensor]  # (g, n): sorted position that fills each child slot;
                                         # None where that is the identity (no padding)


class GroupLayout(NamedTuple):
    """Where real tokens and padding sit at every level; depends only on (N, m, overlap)."""
    num_groups: int                       # G
    slot_size: int                        # s = ceil(N / G) <= m slots per final group
    num_slots: int                        # P = G * s
    levels: Tuple[_Level, ...]
    key_slots: torch.Tensor               # (G * (s + o),) slot of each key of each group
    key_padding: Optional[torch.Tensor]   # (G, 1, s + o) bool, True = padding; or None
    slot_in_output: torch.Tensor          # (P,) row of slot g * s + j in (s, G) order: j * G + g


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
        in_first = pos < first[:, None]
        halves = torch.stack([in_first, real & ~in_first], dim=1).float()
        # Sorted order of a group: its real tokens by key, then its padding. Child 0 takes the
        # first `first` real tokens, child 1 the rest; each fills up with padding slots.
        j = torch.arange(half)
        child0 = torch.where(j < first[:, None], j, counts[:, None] + j - first[:, None])
        child1 = torch.where(j < second[:, None], first[:, None] + j,
                             counts[:, None] + half - first[:, None] + j - second[:, None])
        if bool((counts < n).any()):
            padding, child_slots = ~real, torch.cat([child0, child1], dim=1)
            levels.append(_Level(padding.to(device), halves.to(device), child_slots.to(device)))
        else:
            levels.append(_Level(None, halves.to(device), None))
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
    slot = torch.arange(num_slots)
    slot_in_output = slot % slot_size * num_groups + slot // slot_size
    return GroupLayout(num_groups, slot_size, num_slots, tuple(levels),
                       key_slots.flatten().to(device),
                       key_padding[:, None].to(device) if key_padding.any() else None,
                       slot_in_output.to(device))


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
    +inf, so they sort behind the real tokens.

    Args:
        x: (..., N, d) features (one matrix per image and head; any strides).
        layout: :func:`group_layout` of (N, m, overlap).
        iters: refinement iterations per split; sharpness: soft-assignment inverse temperature.

    Returns:
        (R, P) long, R = the product of the leading dims: token index of every slot in group
        order (G groups of ``layout.slot_size`` slots); indices ``>= N`` are padding.
    """
    num_tokens, dim = x.shape[-2:]
    feats = x.new_empty(*x.shape[:-2], layout.num_slots, dim)
    feats[..., :num_tokens, :] = x
    feats[..., num_tokens:, :] = 0
    feats = feats.view(-1, 1, layout.num_slots, dim)
    rows = feats.shape[0]
    inv_norm = feats.norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_().transpose(-1, -2)
    order = spare = None
    for level in layout.levels:
        groups, _, n = level.halves.shape
        tokens = feats.transpose(-1, -2)
        sums = level.halves.to(x.dtype) @ feats                                  # (R, g, 2, d)
        sharp_inv_norm = inv_norm * sharpness
        for _ in range(iters):
            scores = (F.normalize(sums, dim=-1) @ tokens) * sharp_inv_norm       # (R, g, 2, n)
            sums = scores.softmax(dim=-2) @ feats
        scores = ((F.normalize(sums, dim=-1) @ tokens) * inv_norm).add_(1)
        key = scores[..., 0, :] / scores[..., 1, :]
        if level.padding is not None:
            key.masked_fill_(level.padding, float('inf'))
        within = key.argsort(dim=-1)
        if level.child_slots is not None:
            within = within.gather(-1, level.child_slots.expand(rows, -1, -1))
        order = within if order is None else order.gather(-1, within)
        order = order.view(rows, 2 * groups, n // 2)
        if 2 * groups == layout.num_groups:
            break
        # children are permutations inside their parent's span: gathering from the previous
        # level's features keeps the reads local (cache-friendly), unlike reads in token order
        index = (within + torch.arange(0, rows * groups * n, n, device=x.device).view(
            rows, groups, 1)).view(-1)
        # two buffers take turns: fresh large allocations each level cost page faults on CPU
        spare = torch.empty_like(feats) if spare is None else spare
        torch.index_select(feats.view(-1, dim), 0, index, out=spare.view(-1, dim))
        feats, spare = spare.view(rows, 2 * groups, n // 2, dim), feats
        inv_norm = inv_norm.reshape(-1).index_select(0, index).view(rows, 2 * groups, 1, n // 2)
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
        qkv = self._head_major_qkv(x)  # (B, N, heads, 3, d)
        if n <= self.group_size:
            q, k, v = qkv.permute(3, 0, 2, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, n, c)
        else:
            out = self._grouped_attention(qkv)
        # the values in channels-last layout: copying them there is a plain strided copy, the
        # convolution keeps the layout, and its output is already (B, N, C) in memory
        v_map = qkv[..., 2, :].reshape(b, *hw_shape, c).permute(0, 3, 1, 2)
        out = out + self.lepe(v_map).permute(0, 2, 3, 1).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def _head_major_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, heads, 3, d): the ``qkv`` projection with the q, k and v of a
        head side by side, so that one row gather fetches all three."""
        heads, c = self.num_heads, x.shape[-1]
        weight = self.qkv.weight.view(3, heads, -1, c).transpose(0, 1).reshape(-1, c)
        bias = self.qkv.bias
        if bias is not None:
            bias = bias.view(3, heads, -1).transpose(0, 1).reshape(-1)
        return F.linear(x, weight, bias).view(*x.shape[:2], heads, 3, -1)

    def _grouped_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, heads, 3, d) projections -> (B, N, C) attention inside the balanced groups.

        q, k and v of every key slot are gathered in one go from the projection's rows (one row
        per token and head); padding slots point at a real token: as keys they are masked, as
        queries their outputs are never read back.
        """
        b, n, heads, _, d = qkv.shape
        rows = b * heads
        layout = group_layout(n, self.group_size, self.overlap, qkv.device)
        groups, slot_size = layout.num_groups, layout.slot_size
        queries = qkv[..., 0, :].detach().transpose(1, 2)
        order = balanced_clustering(queries, layout)  # (rows, P): the token in each slot

        row = torch.arange(rows, device=qkv.device)[:, None]
        first_row = row // heads * (n * heads) + row % heads  # qkv row of token 0, per row
        key_token = order.clamp(max=n - 1)[:, layout.key_slots]
        qkv_g = qkv.reshape(-1, 3 * d).index_select(0, (key_token * heads + first_row).view(-1))
        qkv_g = qkv_g.view(rows, groups, -1, 3, d)  # keys: own slots first, then the overlap
        q_g, k_g, v_g = qkv_g[:, :, :slot_size, 0], qkv_g[..., 1, :], qkv_g[..., 2, :]
        mask = None
        if layout.key_padding is not None:
            # every group has real keys, so no softmax row is fully masked; a mask expanded to
            # the full (rows, G, s, s + o) shape lets SDPA take its fused CPU kernel
            mask = torch.zeros(layout.key_padding.shape, dtype=qkv.dtype, device=qkv.device)
            mask = mask.masked_fill_(layout.key_padding, float('-inf')).expand(
                rows, -1, slot_size, -1)
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, scale=self.scale)
        # fused SDPA kernels write (rows, s, G, d) memory; reading it in that order is a view
        out = out.transpose(1, 2).reshape(-1, d)

        # the output row of every real token (padding slots all land in the dropped column n)
        out_row = torch.empty(rows, n + 1, dtype=torch.long, device=qkv.device)
        out_row.scatter_(1, order.clamp(max=n), layout.slot_in_output.expand(rows, -1))
        out_row = (out_row[:, :n] + row * layout.num_slots).view(b, heads, n).transpose(1, 2)
        return out.index_select(0, out_row.flatten()).view(b, n, heads * d)


__all__: List[str] = ['FeatureSpaceLocalAttention', 'balanced_clustering', 'group_layout',
                      'GroupLayout']
