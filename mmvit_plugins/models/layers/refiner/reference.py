"""The refiner module (the "conv_exapnd" DLA of the public code): its layers, the
module-by-module formulation (the specification that the fused paths of :mod:`.batch_stats` and
:mod:`.folded` are tested against) and :meth:`DistributedLocalAttention.refine`, which runs the
formulation or a fused path as ``refiner_impl`` chooses."""
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.utils.checkpoint as cp
from torch import nn

from .batch_stats import RefineOptions, RefinerWeights, RefineWithBatchStats
from .folded import refine_folded
from .impl import refiner_impl_on, resolve_refiner_impl
from .stats import (
    BatchNorm,
    batch_norm,
    normalises_locally,
    synchronises,
    update_running_stats,
    uses_batch_stats,
)
from .tiling import DEFAULT_CHUNK_POLICY, WHOLE_MAPS, ChunkPolicy, padded_window_layout


class DistributedLocalAttention(nn.Module):
    """The refiner ("conv_exapnd" DLA of the public code) on attention maps (B, H, L, L).

    1x1 conv H -> eH + BN + ReLU6, depthwise kxk "same" conv + BN + ReLU6, 1x1 conv eH -> H + BN,
    plus the input. ``mask`` (B, 1, L, L), True where query and key are real tokens: the expanded
    maps are zeroed elsewhere before the depthwise conv, so that padding tokens of a partial window
    act like the conv's own zero padding.

    :meth:`forward` is this formulation, module by module. The sharing block calls
    :meth:`refine`, which with ``refiner_impl`` (see :func:`refiner_impl_on`) ``'reference'``
    runs it and with ``'fused'`` computes the same numbers for speed and memory: the 1x1 convs
    as matrix products over the head axis producing channels-last maps (the depthwise conv's
    fast layout), BatchNorms that use running statistics folded into the convs, in-place
    activations, and under autograd the maps recomputed in the backward instead of stored.
    ``refiner_impl`` is resolved when the module is built (:func:`resolve_refiner_impl`; None:
    the environment variable ``MMVIT_REFINER_IMPL``) and may be reassigned later, as may
    ``chunk_policy`` (:class:`ChunkPolicy`: how the fused paths tile the maps).
    """

    def __init__(self, num_heads: int, expansion: int = 3, kernel_size: int = 3,
                 refiner_impl: Optional[str] = None,
                 chunk_policy: ChunkPolicy = DEFAULT_CHUNK_POLICY):
        super().__init__()
        self.refiner_impl = resolve_refiner_impl(refiner_impl)
        self.chunk_policy = chunk_policy
        hidden = num_heads * expansion
        self.conv_exp = nn.Conv2d(num_heads, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depth_sep_conv = nn.Conv2d(hidden, hidden, kernel_size, padding='same',
                                        groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv_pro = nn.Conv2d(hidden, num_heads, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(num_heads)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, attn: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # In-place ops on BN outputs (BN backward needs only its input) save map-sized copies.
        x = self.bn1(self.conv_exp(attn))
        if mask is not None:
            x.masked_fill_(~mask, 0.)
        x = self.act(self.bn2(self.depth_sep_conv(self.act(x))))
        return self.bn3(self.conv_pro(x)).add_(attn)

    def refine(self, attn: torch.Tensor, out_norm: BatchNorm, scale: float,
               mask: Optional[torch.Tensor] = None,
               windows: Optional[Tuple[Tuple[int, int], int]] = None) -> torch.Tensor:
        """``out_norm(self(attn, mask)) * scale``, zeroed where ``mask`` is False: (B, H, L, L).

        ``windows``: ``((h, w), window)`` when ``attn`` holds the maps of ``window_partition``'s
        windows of (h, w) token grids padded to whole windows and ``mask`` is their padding
        (``window_padding_mask``, as query and key pairs): the chunked paths then skip the
        padding's constant entries (see :func:`padded_window_layout`).

        Under autograd the backward recomputes the expanded maps: besides ``attn`` (kept by the
        computing block anyway) at most one (B, H, L, L) map is kept, instead of ~15 map-sized
        tensors of the module formulation (what bounded the training memory).

        BatchNorms: BatchNorm2d, mmengine's ``_BatchNormXd`` and SyncBatchNorm outside a
        multi-process run take the chunked paths. A SyncBatchNorm that synchronises (training,
        several processes) takes the recomputed formulation with its statistics all-reduced:
        it keeps ``attn`` and the mask as well, but its backward recomputes the whole expanded
        maps of the block at once (~15 map-sized tensors while one sharing block's backward
        runs). Running statistics are updated once per forward, never by a recomputation.
        BatchNorms with a forward of their own run module by module.
        """
        norms = (self.bn1, self.bn2, self.bn3, out_norm)
        train_norms = [bn for bn in norms if uses_batch_stats(bn)]
        if refiner_impl_on(self.refiner_impl, attn.device) == 'reference':
            return self._refine_reference(attn, out_norm, scale, mask)
        tiling = self.chunk_policy.tiling(attn.device)
        layout = WHOLE_MAPS
        if tiling.chunk_elements and windows is not None and mask is not None:
            layout = padded_window_layout(*windows, len(attn),
                                          self.depth_sep_conv.kernel_size[0] // 2, attn.device)
        if len(train_norms) == len(norms) and self.depth_sep_conv.kernel_size[0] % 2 and all(
                normalises_locally(bn) and bn.affine for bn in norms):
            options = RefineOptions(tuple(bn.eps for bn in norms), scale, tiling, layout)
            out, *stats = RefineWithBatchStats.apply(attn, mask, options,
                                                     *self._weights(out_norm))
            update_running_stats(norms, [
                stat for i, bn in enumerate(norms) if bn.track_running_stats
                for stat in stats[2 * i:2 * i + 2]])
            return out
        if not train_norms:
            fn = partial(refine_folded, self, out_norm=out_norm, scale=scale, tiling=tiling,
                         layout=layout)
        elif all(normalises_locally(bn) or synchronises(bn) for bn in train_norms):
            fn = partial(self._refine_batch_stats, out_norm=out_norm, scale=scale)
        else:  # BatchNorms with a forward of their own
            return self._refine_reference(attn, out_norm, scale, mask)
        if torch.is_grad_enabled() and (attn.requires_grad or
                                        any(p.requires_grad for p in self.parameters())):
            out, *batch_stats = cp.checkpoint(fn, attn, mask, use_reentrant=False,
                                              preserve_rng_state=False)
        else:
            out, *batch_stats = fn(attn, mask)
        update_running_stats(train_norms, batch_stats)
        return out

    def _weights(self, out_norm: BatchNorm) -> RefinerWeights:
        """The parameters of the refiner and of ``out_norm``, named."""
        return RefinerWeights(
            self.conv_exp.weight, self.bn1.weight, self.bn1.bias, self.depth_sep_conv.weight,
            self.bn2.weight, self.bn2.bias, self.conv_pro.weight, self.bn3.weight, self.bn3.bias,
            out_norm.weight, out_norm.bias)

    def _refine_reference(self, attn: torch.Tensor, out_norm: BatchNorm, scale: float,
                          mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`refine` module by module: (B, H, L, L)."""
        out = out_norm(self(attn, mask)).mul_(scale)
        return out if mask is None else out.masked_fill_(~mask, 0.)

    def _refine_batch_stats(self, attn: torch.Tensor, mask: Optional[torch.Tensor],
                            out_norm: BatchNorm, scale: float) -> List[torch.Tensor]:
        """:meth:`refine` module by module for BatchNorms that (may) use batch statistics,
        without touching their buffers: the refined map, then the batch statistics for
        :func:`update_running_stats`."""
        b, h, n, _ = attn.shape
        e = self.conv_exp.out_channels
        stats: List[torch.Tensor] = []
        # The 1x1 convs as matrix products over the head axis. The maps stay contiguous
        # (B, C, L, L): BatchNorm's and ReLU6's backward are slow on channels-last maps.
        x = torch.bmm(self.conv_exp.weight.view(e, h).expand(b, e, h), attn.reshape(b, h, n * n))
        x = batch_norm(x.view(b, e, n, n), self.bn1, stats)
        if mask is not None:
            x.masked_fill_(~mask, 0.)
        x = self.depth_sep_conv(self.act(x))
        x = self.act(batch_norm(x, self.bn2, stats))
        x = torch.bmm(self.conv_pro.weight.view(h, e).expand(b, h, e), x.reshape(b, e, n * n))
        x = batch_norm(x.view(b, h, n, n), self.bn3, stats).add_(attn)
        x = batch_norm(x, out_norm, stats).mul_(scale)
        if mask is not None:
            x.masked_fill_(~mask, 0.)
        return [x, *stats]
