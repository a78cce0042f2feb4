"""Refiner-ViT (Zhou et al., "Refiner: Refining Self-attention for Vision Transformers",
arXiv 2106.03714) as a detection/segmentation backbone.

The trunk is the public model: a CNN patch stem (stride 16), then blocks that alternate between
computing attention and sharing the previous block's attention map through the refiner (DLA).
For dense prediction most blocks attend within windows (the refiner then runs on each window's
map) and a few globally, and a simple feature pyramid turns the stride-16 tokens into strides
4/8/16/32.
"""
import math
import os
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.registry import MODELS
from timm.layers import DropPath, LayerNorm2d, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.nn import functional as F

from mmvit_plugins.checkpoint import KeyLayout
from mmvit_plugins.models.layers import (
    SimpleFeaturePyramid,
    capturing,
    ceil_div,
    contains,
    crop_end,
    pad_end,
    pad_to,
    pad_to_multiple,
    resize_abs_pos_embed,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from mmvit_plugins.models.layers.capture import Size, autocast_off, size_cache
from mmvit_plugins.models.layers.pyramid import PYRAMID_STRIDES

from .base import (
    PyramidBackbone,
    check_heads,
    check_indices,
    check_int,
    check_number,
    check_probability,
    checkpoint,
    drop_path_rates,
    output_dtype,
    resolve_arch,
)

PATCH_SIZE = 16
# Every public block scales its input by this before the norms and divides the branches by it.
ADJUST_RATIO = 0.5
_CLASSIFIER_KEYS = ('head.', 'aux_head.', 'norm.')


# Elements of the 3x-expanded map per chunk of the refiner's chunked paths: on the CPU ~4 MB,
# so that chunks stay in the caches and in the allocator's reused heap (a fresh map-sized
# tensor costs a page fault per 4 KB, more than the arithmetic on it, so 4 MB chunks train
# faster than 8 MB ones); elsewhere a chunk bounds the peak memory of large global maps at a
# few launches.
_CHUNK_ELEMENTS = {'cpu': 1 << 20}
_CHUNK_ELEMENTS_DEFAULT = 1 << 26
_MIN_CHUNK_ROWS = 16

# The refiner's implementations (``refiner_impl``): 'fused' the hand-written chunked passes
# (:class:`_RefineWithBatchStats`, :meth:`DistributedLocalAttention._refine_folded`), 'reference'
# the module-by-module formulation (:meth:`DistributedLocalAttention.forward`), 'auto' the one
# :data:`_AUTO_REFINER_IMPL` names for the input's device type.
REFINER_IMPLS = ('auto', 'fused', 'reference')
REFINER_IMPL_ENV = 'MMVIT_REFINER_IMPL'
# 'auto' per device type (docs/devices.md has the measurements): 'cpu' measured, the fused
# path is faster there and needs less memory. Elsewhere not measured: 'fused' for its bounded
# training memory, although it dispatches more operators (kernel launches) than 'reference'.
_AUTO_REFINER_IMPL: Dict[str, str] = {'cpu': 'fused'}
_AUTO_REFINER_IMPL_DEFAULT = 'fused'


def resolve_refiner_impl(impl: Optional[str] = None) -> str:
    """The refiner implementation a module built now uses: ``impl``, or when None the
    environment variable ``MMVIT_REFINER_IMPL`` (unset: ``'auto'``); checked."""
    name = 'refiner_impl'
    if impl is None:
        name, impl = REFINER_IMPL_ENV, os.environ.get(REFINER_IMPL_ENV) or 'auto'
    if impl not in REFINER_IMPLS:
        raise ValueError(f'{name}={impl!r} is invalid; allowed values: {REFINER_IMPLS}')
    return impl


def refiner_impl_on(impl: str, device: torch.device) -> str:
    """``'fused'`` or ``'reference'``: what ``impl`` (see :data:`REFINER_IMPLS`) runs on
    ``device``."""
    if impl != 'auto':
        return impl
    return _AUTO_REFINER_IMPL.get(device.type, _AUTO_REFINER_IMPL_DEFAULT)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the refiner's sums of statistics: float64, float32 on ``mps`` (which has
    no float64)."""
    return torch.float32 if device.type == 'mps' else torch.float64


def _scatter_per_window_on(device: torch.device) -> bool:
    """Whether the refiner writes a piece of the padded-window maps back with one
    ``index_copy_`` per window (measured faster on the CPU: 24 against 28 ms for the write-backs
    of a training step of an all-windowed Refiner-ViT-S at 512x512) rather than with one over
    the flattened maps (elsewhere: one kernel launch instead of one per window)."""
    return device.type == 'cpu'


def _channels_last_on(device: torch.device) -> bool:
    """Whether the stem and the pyramid's inputs use channels-last maps and the stem's last
    conv runs as one matrix product: measured faster on the CPU (oneDNN) only."""
    return device.type == 'cpu'


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalises with the statistics of its input (as its forward decides)."""
    return bn.training or bn.running_mean is None


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm that uses its running statistics as ``x * scale + shift``, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _synchronises(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` is a SyncBatchNorm that reduces its batch statistics over processes (as
    its forward decides: in training, with more than one process in its group)."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1)


def _normalises_locally(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn``'s forward is ``F.batch_norm`` on its input (BatchNorm2d, mmengine's
    ``_BatchNormXd``, a SyncBatchNorm that does not synchronise), which the refiner's fast
    paths compute themselves."""
    if isinstance(bn, nn.SyncBatchNorm):
        return not _synchronises(bn)
    return type(bn).forward is nn.modules.batchnorm._BatchNorm.forward


def _sync_batch_norm(x: torch.Tensor, bn: nn.SyncBatchNorm,
                     batch_stats: List[torch.Tensor]) -> torch.Tensor:
    """Training-mode ``bn(x)`` on the batch statistics of every process of ``bn``'s group, as
    SyncBatchNorm computes them, through differentiable all-reduces of the per-channel sums
    (two: the mean, then the centred squares); the mean and unbiased variance are appended
    to ``batch_stats`` where ``bn`` tracks running statistics."""
    from torch.distributed.nn.functional import all_reduce
    group = bn.process_group or dist.group.WORLD
    dims = (0, 2, 3)
    count = x.new_full((1, ), x.numel() // x.shape[1])
    sums = all_reduce(torch.cat([x.sum(dim=dims), count]), group=group)
    count = sums[-1].detach()
    mean = sums[:-1] / count
    centred = x - mean.view(1, -1, 1, 1)
    var = all_reduce(centred.square().sum(dim=dims), group=group) / count
    if bn.track_running_stats:
        batch_stats += [mean.detach(), var.detach() * count / (count - 1).clamp(min=1)]
    out = centred * torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
    if bn.weight is not None:
        out = out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return out


def _batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                batch_stats: List[torch.Tensor]) -> torch.Tensor:
    """``bn(x)`` without touching ``bn``'s buffers: where ``bn`` would update its running
    statistics, the batch mean and unbiased variance are appended to ``batch_stats`` instead
    (:func:`_update_running_stats` applies them), so that a recomputation is free of effects.
    A synchronising SyncBatchNorm reduces the statistics over its processes."""
    if _synchronises(bn):
        return _sync_batch_norm(x, bn, batch_stats)
    if not _uses_batch_stats(bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.,
                            bn.eps)
    if not (bn.training and bn.track_running_stats):
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0., bn.eps)
    # momentum 1: the "running" buffers receive exactly the batch statistics
    mean, var = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
    batch_stats += [mean, var]
    return F.batch_norm(x, mean, var, bn.weight, bn.bias, True, 1., bn.eps)


@torch.no_grad()
def _update_running_stats(bns: Sequence[nn.modules.batchnorm._BatchNorm],
                          batch_stats: Sequence[torch.Tensor]) -> None:
    """What ``bn.forward`` does to the buffers in training, from :func:`_batch_norm`'s stats."""
    stats = iter(batch_stats)
    for bn in bns:
        if not (bn.training and bn.track_running_stats):
            continue
        mean, var = next(stats), next(stats)
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = (1. / bn.num_batches_tracked).to(mean.dtype)
        else:
            factor = bn.momentum
        bn.running_mean.lerp_(mean, factor)
        bn.running_var.lerp_(var, factor)


def _chunk_elements(device: torch.device) -> Optional[int]:
    """Elements of the expanded maps per chunk of the refiner's chunked passes on ``device``.
    None (one chunk) while a graph is captured: a chunk count that follows the map size would
    freeze the size into the graph (whose compiler fuses these steps anyway)."""
    if capturing():
        return None
    return _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_DEFAULT)


def _rows_per_chunk(chunk_elements: Optional[int], row_elements: int) -> Optional[int]:
    """Rows per chunk when one row of the expanded maps has ``row_elements`` elements; at
    least ``_MIN_CHUNK_ROWS``: the depthwise conv's halo is recomputed for every chunk (2 rows
    for a 3x3 kernel), which would outweigh what small chunks gain in the caches (many windows
    in a batch make rows long)."""
    return None if chunk_elements is None else max(chunk_elements // row_elements,
                                                   _MIN_CHUNK_ROWS)


def _row_chunks(num_rows: Size, rows: Optional[int],
                halo: Tuple[int, int]) -> List[Tuple[Size, Size, Size, Size]]:
    """``(r0, r1, i0, i1)`` of every chunk of ``rows`` rows (None: one chunk of all rows, with
    no loop over a symbolic size): its rows [r0, r1) and the rows [i0, i1) that a kernel with
    ``halo = (top, bottom)`` reads for them."""
    if rows is None:
        return [(0, num_rows, 0, num_rows)]
    top, bottom = halo
    return [(r0, min(r0 + rows, num_rows), max(r0 - top, 0), min(r0 + rows + bottom, num_rows))
            for r0 in range(0, num_rows, rows)]


def _moments(x: torch.Tensor, dim: Tuple[int, ...], tmp: Optional[torch.Tensor] = None
             ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) of ``x`` over ``dim``, two-pass (``torch.var_mean`` is
    several times slower on the CPU); ``tmp``: a buffer of ``x``'s shape for the squares."""
    mean = x.mean(dim=dim)
    shape = [x.shape[i] if i not in dim else 1 for i in range(x.dim())]
    var = torch.sub(x, mean.view(shape), out=tmp).square_().mean(dim=dim)
    return x.numel() // mean.numel(), mean, var


def _tile(v: torch.Tensor, n: int) -> torch.Tensor:
    """Per-channel values (C,) -> (n, C), to broadcast over channels-last (..., n, C) maps: the
    CPU kernels then run one contiguous loop over n * C elements instead of n short loops over
    C."""
    return v.repeat(n).view(n, -1)


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of a channels-last (..., n, C) map whose last two dims are contiguous
    (summed as n * C columns first, faster on the CPU than over C columns): (C,)."""
    return x.flatten(-2).sum(dim=tuple(range(x.dim() - 2))).view(x.shape[-2], -1).sum(0)


def _channel_moments(x: torch.Tensor, tmp: Optional[torch.Tensor] = None
                     ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) per channel of a channels-last map, as :func:`_moments`
    over all dims but the last."""
    count = x.numel() // x.shape[-1]
    mean = _channel_sums(x) / count
    var = _channel_sums(torch.sub(x, _tile(mean, x.shape[-2]), out=tmp).square_()) / count
    return count, mean, var


def _hardtanh_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ReLU6's backward (zero at the bounds) in place on ``grad``."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, 0., 6., grad_input=grad)


def _merge_moments(moments: List[Tuple[int, torch.Tensor, torch.Tensor]]
                   ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) of chunks -> of their union (Chan et al.), in float64
    where the device has it."""
    count, mean, m2 = 0, 0., 0.
    for n, chunk_mean, chunk_var in moments:
        dtype = _accumulation_dtype(chunk_mean.device)
        chunk_mean, chunk_var = chunk_mean.to(dtype), chunk_var.to(dtype)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_var * n + delta.square() * (count * n / total)
        count = total
    return count, mean, m2 / count


class _Workspace:
    """Buffers that the chunks of the refiner's passes reuse (``out=``): on the CPU a fresh
    chunk-sized tensor costs a page fault per 4 KB, more than the arithmetic on it. Disabled
    (every request None: the ops allocate) for one whole-map chunk, e.g. while a graph is
    captured."""

    def __init__(self, like: torch.Tensor, enabled: bool):
        self.like, self.enabled = like, enabled
        self.buffers: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> Optional[torch.Tensor]:
        """A contiguous ``shape`` view of buffer ``name`` (grown when too small)."""
        if not self.enabled:
            return None
        size = math.prod(shape)
        if name not in self.buffers or self.buffers[name].numel() < size:
            self.buffers[name] = self.like.new_empty(size)
        return self.buffers[name][:size].view(shape)


class _MapPiece:
    """Some of the batch's (B, C, L, L) maps, ``windows`` (None: all), restricted to the query
    and key tokens ``tokens`` (None: all): gathered to (B', C, T, T). Built from Python ints
    (no tensor is read to find the pieces, nor to scatter them back)."""

    def __init__(self, windows: Optional[List[int]] = None, tokens: Optional[List[int]] = None,
                 size: int = 0, device: Optional[torch.device] = None):
        self.window_list = windows
        self.windows = None if windows is None else torch.tensor(windows, device=device)
        self.num_tokens = None if tokens is None else len(tokens)
        index = None if tokens is None else torch.tensor(tokens, device=device)
        # the entries' indices in the flattened size x size maps
        self.entries = None if index is None else (index[:, None] * size + index).flatten()
        self.whole = windows is None and tokens is None
        self._flat_indices: Dict[Tuple[int, ...], torch.Tensor] = {}

    def _flat_index(self, full: torch.Tensor) -> torch.Tensor:
        """The indices of the piece's entries in ``full.view(-1)``, in the order of the gathered
        (B', C, T, T) values: (B' * C * T * T,), cached per shape of ``full``."""
        shape = tuple(full.shape)
        if shape not in self._flat_indices:
            b, c = shape[:2]
            windows = torch.arange(b, device=full.device) if self.windows is None \
                else self.windows
            maps = windows[:, None] * c + torch.arange(c, device=full.device)
            self._flat_indices[shape] = (maps[:, :, None] * shape[2] * shape[3]
                                         + self.entries).flatten()
        return self._flat_indices[shape]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.windows is not None:
            t = t.index_select(0, self.windows)
        if self.entries is not None:
            t = t.flatten(2).index_select(2, self.entries).view(
                *t.shape[:2], self.num_tokens, self.num_tokens)
        return t

    def scatter_(self, full: torch.Tensor, values: torch.Tensor,
                 accumulate: bool = False) -> torch.Tensor:
        """``full`` at the piece's entries set to (``accumulate``: plus) ``values``."""
        if self.entries is None:
            fn = full.index_add_ if accumulate else full.index_copy_
            return fn(0, self.windows, values)
        if _scatter_per_window_on(full.device):
            flat, values = full.flatten(2), values.flatten(2)
            windows = range(len(full)) if self.window_list is None else self.window_list
            for i, w in enumerate(windows):
                fn = flat[w].index_add_ if accumulate else flat[w].index_copy_
                fn(1, self.entries, values[i])
            return full
        flat = full.view(-1)
        fn = flat.index_add_ if accumulate else flat.index_copy_
        fn(0, self._flat_index(full), values.reshape(-1))
        return full


# Pieces of the maps and the number of map entries (per head) outside them.
MapLayout = Tuple[Tuple[_MapPiece, ...], int]
_WHOLE_MAPS: MapLayout = ((_MapPiece(),), 0)


@size_cache(maxsize=32)
def _padded_window_layout(hw: Tuple[int, int], window: int, num_maps: int, pad: int,
                          device: torch.device) -> MapLayout:
    """The pieces of ``num_maps`` (B * windows, H, L, L) attention maps of the windows of B
    (h, w) token grids padded to whole ``window`` x ``window`` windows (``window_partition``'s
    order, masked by ``window_padding_mask``) that the refiner's expanded steps compute.

    The expanded maps are zeroed at padding queries and keys before the depthwise conv (``pad``
    rows and columns each side), so that they are the same per-channel constants at every entry
    more than ``pad`` rows or columns away from a real query and key: the windows are grouped by
    their real extent and restricted to the tokens within that reach of real ones. The gathered
    maps stay adjacent where it matters: a token within reach whose neighbour is not has, in the
    gathered order, a padding neighbour, zero like the conv's own padding. The whole maps when
    nothing would be spared but a tenth of the entries. From sizes only: no tensor is read.
    """
    h, w = hw
    size = window * window
    extents = [(min(window, h - y), min(window, w - x))
               for y in range(0, h, window) for x in range(0, w, window)]
    batch = num_maps // len(extents)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, extent in enumerate(extents):
        groups.setdefault(extent, []).append(i)
    total = batch * len(extents) * size * size
    reaches = {}
    for rows, cols in groups:
        real = {r * window + c for r in range(rows) for c in range(cols)}
        reaches[rows, cols] = sorted({t + d for t in real for d in range(-pad, pad + 1)
                                      if 0 <= t + d < size})
    entries = {extent: batch * len(groups[extent]) * len(reach) ** 2
               for extent, reach in reaches.items()}
    if sum(entries.values()) > 0.9 * total:
        return _WHOLE_MAPS
    pieces = []
    for extent in sorted(groups, key=entries.__getitem__, reverse=True):
        windows = None if len(groups) == 1 else [
            b * len(extents) + i for b in range(batch) for i in groups[extent]]
        tokens = None if len(reaches[extent]) == size else reaches[extent]
        pieces.append(_MapPiece(windows, tokens, size, device))
    return tuple(pieces), total - sum(entries.values())


def _piece_maps(a: torch.Tensor, keep: Optional[torch.Tensor], pieces: Sequence[_MapPiece],
                e: int, halo: Tuple[int, int], chunk_elements: Optional[int]
                ) -> List[Tuple[_MapPiece, torch.Tensor, Optional[torch.Tensor], List[Tuple]]]:
    """Per piece: the piece, its map (B', H, R, K) and float mask (``keep``, (B, 1, L, L),
    gathered), and the chunks ``(r0, r1, i0, i1)`` of its query rows with the rows [i0, i1)
    that the depthwise conv (``halo`` rows above and below) reads; ``e`` expanded channels."""
    out = []
    for piece in pieces:
        a_p = piece.gather(a)
        b, _, r, k = a_p.shape
        out.append((piece, a_p, None if keep is None else piece.gather(keep),
                    _row_chunks(r, _rows_per_chunk(chunk_elements, b * e * k), halo)))
    return out


class _RefineWithBatchStats(torch.autograd.Function):
    """:meth:`DistributedLocalAttention.refine` with all four BatchNorms on batch statistics,
    in chunks of query rows, so that the expanded maps never exist whole in the forward.

    ``conv_exp`` is linear in the map, so bn1's statistics come from the heads' mean and
    covariance (H x H) and its backward reduces to H x H algebra plus two products with the
    gradient of its output; the depthwise conv's output is kept from the statistics pass to the
    projection in the forward, and its normalised values from the first backward pass (the
    sums bn2's backward needs) to the second: one expanded map at a time, only while the
    Function runs. For the backward only the input map and the (B, H, L, L) output of
    ``conv_pro`` are kept. Map-sized (B, H, L, L) steps run chunk by chunk too, on reused
    chunk buffers: besides the output, one fresh map-sized tensor in the forward (``conv_pro``'s
    output) and two in the backward (the map gradient, bn3's input gradient).

    The expanded steps run on the pieces of a :data:`MapLayout`; at the entries outside them
    the expanded maps are constants (conv output 0), entered in the statistics and sums in
    closed form: with padded windows about half of the work.

    Inputs: the map (B, H, L, L), the mask (B, 1, L, L) or None, the weights and BN affines
    (``w1, g1, b1, w2, g2, b2, w3, g3, b3, g4, b4``), the four BN eps, the output scale, the
    expanded elements per chunk (None: one chunk) and the layout. Outputs: the refined map,
    then each BN's batch mean and unbiased variance (for the running statistics).
    """

    @staticmethod
    def _h1(a: torch.Tensor, center: torch.Tensor, keep: Optional[torch.Tensor],
            w1t: torch.Tensor, r0: int, r1: int, ws: _Workspace
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """relu6(bn1(conv_exp(a))) on query rows [r0, r1) of a (B, H, R, K) map, times the
        float mask ``keep`` (B, 1, R, K): channels-last (B, r1 - r0, K, eH), in buffer ``'h1'``;
        and ``a - center`` on these rows, ``center`` the heads' means (H, 1, 1).

        ``w1t`` (H + 1, eH): conv and BN folded for the centred map, bn1's shift as its last
        row, which meets a row of ones appended to the centred map (the shift added by the
        matrix product, not by a pass over the expanded map). Centred: nearly uniform maps
        (at initialisation) make bn1's scale large, and ``s1 * (W1 a) + t1`` would then cancel
        in float32."""
        b, h, _, n = a.shape
        e = w1t.shape[-1]
        if ws.enabled:
            aug = ws('augmented', b, h + 1, r1 - r0, n)
            torch.sub(a[:, :, r0:r1], center, out=aug[:, :h])
            aug[:, h].fill_(1.)
        else:
            aug = torch.cat([a[:, :, r0:r1] - center, a.new_ones(b, 1, r1 - r0, n)], dim=1)
        x = torch.bmm(aug.view(b, h + 1, -1).transpose(1, 2), w1t.expand(b, -1, -1),
                      out=ws('h1', b, (r1 - r0) * n, e))
        x = x.view(b, r1 - r0, n, e).clamp_(0., 6.)
        if keep is not None:  # a float mask: broadcasting masked_fill_ is slow on the CPU
            x.mul_(keep[:, 0, r0:r1, :, None])
        return x, aug[:, :h]

    @staticmethod
    def _map_chunks(a: torch.Tensor, e: int, chunk_elements: Optional[int]
                    ) -> List[Tuple[Size, Size]]:
        """Query-row chunks [r0, r1) of the map-sized steps on the whole (B, H, L, L) map."""
        b, _, n, _ = a.shape
        return [(r0, r1) for r0, r1, _, _ in
                _row_chunks(n, _rows_per_chunk(chunk_elements, b * e * n), (0, 0))]

    @staticmethod
    def _folded_w1(mean_a: torch.Tensor, w1m: torch.Tensor, s1: torch.Tensor,
                   b1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The heads' means in the map's dtype (H, 1, 1) and ``conv_exp`` + bn1 folded for the
        centred map (H + 1, eH) (see :meth:`_h1`): ``(W1 * s1)^T`` over bn1's shift for the
        centred map, ``b1 - s1 * W1 (mu - center)``."""
        center = mean_a.to(s1.dtype)
        shift = (w1m.to(mean_a.dtype) @ (mean_a - center.to(mean_a.dtype))).to(s1.dtype)
        w1t = torch.cat([(w1m * s1[:, None]).t(), (b1 - s1 * shift)[None]])
        return center.view(-1, 1, 1), w1t

    @staticmethod
    def _head_moments(a: torch.Tensor, chunks: List[Tuple[int, int]], ws: _Workspace
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean (H,) and biased covariance (H, H) of the heads of ``a`` over batch, rows and
        columns, accumulated in float64 where the device has it."""
        b, h, n, _ = a.shape
        acc = _accumulation_dtype(a.device)
        center = a.mean(dim=(0, 2, 3))
        shift, cov = 0., 0.
        for r0, r1 in chunks:
            d = torch.sub(a[:, :, r0:r1], center.view(h, 1, 1),
                          out=ws('centred', b, h, r1 - r0, n)).view(b, h, -1)
            shift = shift + d.sum(dim=(0, 2)).to(acc)
            cov = cov + torch.bmm(d, d.transpose(1, 2)).sum(0).to(acc)
        count = b * n * n
        shift = shift / count
        return center.to(acc) + shift, cov / count - shift[:, None] * shift[None]

    @staticmethod
    def forward(ctx, a: torch.Tensor, mask: Optional[torch.Tensor], w1: torch.Tensor,
                g1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, g2: torch.Tensor,
                b2: torch.Tensor, w3: torch.Tensor, g3: torch.Tensor, b3: torch.Tensor,
                g4: torch.Tensor, b4: torch.Tensor, eps: Tuple[float, ...], scale: float,
                chunk_elements: Optional[int], layout: MapLayout) -> Tuple[torch.Tensor, ...]:
        b, h, n, _ = a.shape
        e = w1.shape[0]
        pad = w2.shape[-1] // 2
        count = b * n * n
        w1m, w3m = w1.view(e, h), w3.view(h, e)
        pieces, far = layout
        keep = None if mask is None else mask.to(a.dtype)
        maps = _piece_maps(a, keep, pieces, e, (pad, pad), chunk_elements)
        chunks = _RefineWithBatchStats._map_chunks(a, e, chunk_elements)
        ws = _Workspace(a, chunk_elements is not None)

        def rsqrt(var: torch.Tensor, i: int) -> torch.Tensor:
            return torch.rsqrt(var + eps[i])

        # bn1's statistics: conv_exp(a) = W1 a has mean W1 mu and variance diag(W1 C W1^T)
        mean_a, cov_a = _RefineWithBatchStats._head_moments(a, chunks, ws)
        w1acc = w1m.to(mean_a.dtype)
        mean1 = (w1acc @ mean_a).to(a.dtype)
        var1 = ((w1acc @ cov_a) * w1acc).sum(1).clamp_(min=0.).to(a.dtype)
        s1 = g1 * rsqrt(var1, 0)
        center, w1t = _RefineWithBatchStats._folded_w1(mean_a, w1m, s1, b1)
        zeros = a.new_zeros(e)
        y2, moments = [], [(far, zeros, zeros)] if far else []
        for _, a_p, keep_p, spans in maps:
            y2.append([])
            for r0, r1, s0, s1_ in spans:
                x = _RefineWithBatchStats._h1(a_p, center, keep_p, w1t, s0, s1_, ws)[0]
                x = F.conv2d(x.permute(0, 3, 1, 2), w2, padding=pad, groups=e)
                x = x[:, :, r0 - s0:r1 - s0].permute(0, 2, 3, 1)  # (B', R, K, eH)
                moments.append(_channel_moments(x, ws('sq', *x.shape)))
                y2[-1].append(x)
        _, mean2, var2 = _merge_moments(moments)
        mean2, var2 = mean2.to(a.dtype), var2.to(a.dtype)
        s2 = g2 * rsqrt(var2, 1)
        t2 = b2 - mean2 * s2
        # conv_pro's output y3 and its statistics, chunk by chunk; outside the pieces
        # relu6(bn2(0)) projected
        y3_far = w3m @ t2.clamp(0., 6.)
        y3 = None
        if len(maps) > 1 or not pieces[0].whole or len(maps[0][3]) > 1:
            y3 = a.new_empty(b, h, n, n)
            if far:
                y3.copy_(y3_far.view(1, h, 1, 1).expand_as(y3))
        moments = [(far, y3_far, torch.zeros_like(y3_far))] if far else []
        for (piece, a_p, _, spans), y2_p in zip(maps, y2):
            b_p, _, r, k = a_p.shape
            t2_p, s2_p = _tile(t2, k), _tile(s2, k)
            w3e = w3m.expand(b_p, h, e)
            y3_p = y3 if piece.whole else a.new_empty(b_p, h, r, k)
            for i, (r0, r1, _, _) in enumerate(spans):
                x, y2_p[i] = y2_p[i], None
                x = torch.addcmul(t2_p, x, s2_p, out=ws('x2', *x.shape)).clamp_(0., 6.)
                y = torch.bmm(w3e, x.view(b_p, -1, e).transpose(1, 2),
                              out=None if y3_p is None else y3_p[:, :, r0:r1].view(b_p, h, -1))
                y = y.view(b_p, h, r1 - r0, k)
                if y3_p is None:  # one whole chunk
                    y3 = y3_p = y
                moments.append(_moments(y, (0, 2, 3), ws('centred', *y.shape)))
            if not piece.whole:
                piece.scatter_(y3, y3_p)
        del y2, x, y, y3_p
        _, mean3, var3 = _merge_moments(moments)
        mean3, var3 = mean3.to(a.dtype), var3.to(a.dtype)
        s3 = g3 * rsqrt(var3, 2)
        s3v, t3v = s3.view(h, 1, 1), (b3 - mean3 * s3).view(h, 1, 1)
        # u = bn3(y3) + a and its statistics, chunk by chunk; then adapt_bn on u in place
        u = torch.empty_like(y3) if len(chunks) > 1 else None
        moments = []
        for r0, r1 in chunks:
            uc = torch.addcmul(t3v, y3[:, :, r0:r1], s3v, out=None if u is None else
                               u[:, :, r0:r1]).add_(a[:, :, r0:r1])
            u = uc if u is None else u
            moments.append(_moments(uc, (0, 2, 3), ws('centred', *uc.shape)))
        _, mean4, var4 = _merge_moments(moments)
        mean4, var4 = mean4.to(a.dtype), var4.to(a.dtype)
        s4 = g4 * rsqrt(var4, 3)
        out = u.mul_((s4 * scale).view(h, 1, 1)).add_(((b4 - mean4 * s4) * scale).view(h, 1, 1))
        if mask is not None:
            out.masked_fill_(~mask, 0.)
        ctx.save_for_backward(a, mask, y3, w1, g1, b1, w2, g2, b2, w3, g3, b3, g4, mean_a, cov_a,
                              mean1, var1, mean2, var2, mean3, var3, mean4, var4)
        ctx.eps, ctx.scale, ctx.chunk_elements = eps, scale, chunk_elements
        ctx.pieces, ctx.far = pieces, far
        unbiased = count / max(count - 1, 1)
        stats = [mean1, var1 * unbiased, mean2, var2 * unbiased, mean3, var3 * unbiased,
                 mean4, var4 * unbiased]
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_) -> Tuple[Optional[torch.Tensor], ...]:
        (a, mask, y3, w1, g1, b1, w2, g2, b2, w3, g3, b3, g4, mean_a, cov_a, mean1, var1, mean2,
         var2, mean3, var3, mean4, var4) = ctx.saved_tensors
        eps, scale, chunk_elements, far = ctx.eps, ctx.scale, ctx.chunk_elements, ctx.far
        b, h, n, _ = a.shape
        e = w1.shape[0]
        pad = w2.shape[-1] // 2
        count = b * n * n
        keep = None if mask is None else mask.to(a.dtype)
        w1m, w3m = w1.view(e, h), w3.view(h, e)
        maps = _piece_maps(a, keep, ctx.pieces, e, (pad, pad), chunk_elements)
        chunks = _RefineWithBatchStats._map_chunks(a, e, chunk_elements)
        ws = _Workspace(a, chunk_elements is not None)
        r1_, r2_, r3_, r4_ = (torch.rsqrt(v + eps[i]) for i, v in
                              enumerate((var1, var2, var3, var4)))
        s3 = g3 * r3_
        s3v, t3v = s3.view(h, 1, 1), (b3 - mean3 * s3).view(h, 1, 1)
        mean3v, r3v, mean4v, r4v = (v.view(h, 1, 1) for v in (mean3, r3_, mean4, r4_))

        def normed4(r0: int, r1: int) -> torch.Tensor:
            """adapt_bn's normalised input on rows [r0, r1), in buffer ``'centred'``."""
            u = torch.addcmul(t3v, y3[:, :, r0:r1], s3v, out=ws('centred', b, h, r1 - r0, n))
            return u.add_(a[:, :, r0:r1]).sub_(mean4v).mul_(r4v)

        def normed3(r0: int, r1: int) -> torch.Tensor:
            """bn3's normalised input on rows [r0, r1), in buffer ``'centred'``."""
            return torch.sub(y3[:, :, r0:r1], mean3v, out=ws('centred', b, h, r1 - r0, n)
                             ).mul_(r3v)

        # adapt_bn's and bn3's backward (BN backward: g - mean(g) - normed * mean(g * normed),
        # times weight * rstd), chunk by chunk on the recomputed normalised inputs
        g = (grad.mul(scale) if keep is None else grad * keep.mul(scale)).contiguous()
        sum_g4, sum_gn4 = g.sum(dim=(0, 2, 3)), 0.
        for r0, r1 in chunks:
            sum_gn4 = sum_gn4 + normed4(r0, r1).mul_(g[:, :, r0:r1]).sum(dim=(0, 2, 3))
        neg_k4, mean_g4, a4 = ((sum_gn4 / -count).view(h, 1, 1), (sum_g4 / count).view(h, 1, 1),
                               (g4 * r4_).view(h, 1, 1))
        sum_g3, sum_gn3 = 0., 0.
        for r0, r1 in chunks:
            gu = g[:, :, r0:r1].addcmul_(normed4(r0, r1), neg_k4).sub_(mean_g4).mul_(a4)
            sum_g3 = sum_g3 + gu.sum(dim=(0, 2, 3))
            sum_gn3 = sum_gn3 + normed3(r0, r1).mul_(gu).sum(dim=(0, 2, 3))
        grad_g4, grad_b4, grad_g3, grad_b3 = sum_gn4, sum_g4, sum_gn3, sum_g3
        neg_k3, mean_g3, a3 = ((sum_gn3 / -count).view(h, 1, 1), (sum_g3 / count).view(h, 1, 1),
                               (g3 * r3_).view(h, 1, 1))
        grad_a = g  # adapt_bn's input gradient; the refiner's map gradient is added to it
        gy3 = torch.empty_like(g)  # bn3's input gradient
        for r0, r1 in chunks:
            torch.addcmul(grad_a[:, :, r0:r1], normed3(r0, r1), neg_k3,
                          out=gy3[:, :, r0:r1]).sub_(mean_g3).mul_(a3)
        # the expanded maps recomputed with the forward's statistics
        s1 = g1 * r1_
        center, w1t = _RefineWithBatchStats._folded_w1(mean_a, w1m, s1, b1)
        # pass 1: bn2's backward needs sum(gz2) and sum(gz2 * n2) over the whole map first;
        # n2 (bn2's normalised input) is kept for pass 2
        n2_kept, gy3_kept = [], []
        grad_w3 = torch.zeros_like(w3m)
        sum_gz2, sum_gz2n2, sum_gy3 = 0., 0., 0.
        for piece, a_p, keep_p, spans in maps:
            b_p, _, r, k = a_p.shape
            mean2_t, r2_t, g2_t, b2_t = (_tile(v, k) for v in (mean2, r2_, g2, b2))
            w3t = w3m.expand(b_p, h, e)
            gy3_p = piece.gather(gy3)
            n2_p = a.new_empty(b_p, r, k, e) if len(spans) > 1 else None
            for r0, r1, s0, s1_ in spans:
                gy = gy3_p[:, :, r0:r1].reshape(b_p, h, -1)
                x1 = _RefineWithBatchStats._h1(a_p, center, keep_p, w1t, s0, s1_, ws)[0]
                y2 = F.conv2d(x1.permute(0, 3, 1, 2), w2, padding=pad, groups=e)
                y2 = y2[:, :, r0 - s0:r1 - s0].permute(0, 2, 3, 1)
                if n2_p is None:
                    n2 = n2_p = y2.sub_(mean2_t).mul_(r2_t)
                else:
                    n2 = torch.sub(y2, mean2_t, out=n2_p[:, r0:r1]).mul_(r2_t)
                x2 = torch.addcmul(b2_t, n2, g2_t, out=ws('x2', *n2.shape)).clamp_(0., 6.)
                grad_w3 += torch.bmm(gy, x2.view(b_p, -1, e)).sum(0)
                gz2 = torch.bmm(gy.transpose(1, 2), w3t, out=ws('gz2', b_p, (r1 - r0) * k, e))
                gz2 = _hardtanh_backward_(gz2.view_as(x2), x2)
                sum_gz2 = sum_gz2 + _channel_sums(gz2)
                sum_gz2n2 = sum_gz2n2 + _channel_sums(gz2.mul_(n2))
            if far:
                sum_gy3 = sum_gy3 + gy3_p.sum(dim=(0, 2, 3))
            n2_kept.append(n2_p)
            gy3_kept.append(gy3_p)
        if far:  # outside the pieces n2 and x2 are constants: sums of gy3 there suffice
            n2_far = -mean2 * r2_
            x2_far = (g2 * n2_far + b2).clamp(0., 6.)
            gy3_far = gy3.sum(dim=(0, 2, 3)) - sum_gy3
            grad_w3 += gy3_far[:, None] * x2_far
            gz2_far = (w3m.t() @ gy3_far) * ((x2_far > 0.) & (x2_far < 6.))
            sum_gz2 = sum_gz2 + gz2_far
            sum_gz2n2 = sum_gz2n2 + gz2_far * n2_far
        del x1, y2, n2, x2, gz2, gy, gy3
        # pass 2: bn2's and the depthwise conv's backward on rows [r0, r1), from gz2 on the
        # rows around them, with bn2's weight * rstd (a2) folded into conv_pro's weight;
        # bn1's backward: sum(gz1), the products of gz1 with the centred map (H x eH) and with
        # W1 (the map gradient, up to an H x H correction made below). Outside the pieces the
        # expanded maps are zero before the depthwise conv: no gradient flows there
        a2 = g2 * r2_
        w2_flipped = w2.flip(-1, -2)
        grad_w2 = torch.zeros_like(w2)
        sum_gz1, gz1_a = 0., 0.
        for (piece, a_p, keep_p, spans), n2_p, gy3_p in zip(maps, n2_kept, gy3_kept):
            b_p, _, r, k = a_p.shape
            g2_t, b2_t = _tile(g2, k), _tile(b2, k)
            neg_mean_gz2, neg_k2 = (_tile(v, k) for v in (a2 * sum_gz2 / -count,
                                                           a2 * sum_gz2n2 / -count))
            w3a = (w3m * a2).expand(b_p, h, e)
            w1f = w1t[:h].expand(b_p, h, e)
            grad_p = grad_a if piece.whole else a.new_zeros(b_p, h, r, k)
            for r0, r1, f0, f1 in spans:
                x1, centred = _RefineWithBatchStats._h1(a_p, center, keep_p, w1t, f0, f1, ws)
                n2 = n2_p[:, f0:f1]
                x2 = torch.addcmul(b2_t, n2, g2_t, out=ws('x2', *n2.shape)).clamp_(0., 6.)
                gy = gy3_p[:, :, f0:f1].reshape(b_p, h, -1)
                gz2 = torch.bmm(gy.transpose(1, 2), w3a, out=ws('gz2', b_p, (f1 - f0) * k, e))
                gy2 = _hardtanh_backward_(gz2.view_as(x2), x2).add_(neg_mean_gz2)
                gy2 = gy2.addcmul_(n2, neg_k2).permute(0, 3, 1, 2)  # (B', eH, F, K)
                gh1 = F.conv2d(gy2, w2_flipped, padding=pad, groups=e)[:, :, r0 - f0:r1 - f0]
                # depthwise weight gradient from the output rows r0:r1 and their input rows
                x1_rows = x1.permute(0, 3, 1, 2)
                if f0 != r0 - pad or f1 != r1 + pad:
                    x1_rows = F.pad(x1_rows, (0, 0, pad - (r0 - f0), pad - (f1 - r1)))
                grad_w2 += torch.ops.aten.convolution_backward(
                    gy2[:, :, r0 - f0:r1 - f0], x1_rows, w2, None, [1, 1], [0, pad], [1, 1],
                    False, [0, 0], e, [False, True, False])[1]
                gz1 = _hardtanh_backward_(gh1.permute(0, 2, 3, 1), x1[:, r0 - f0:r1 - f0])
                sum_gz1 = sum_gz1 + _channel_sums(gz1)
                gz1 = gz1.view(b_p, -1, e)
                centred = centred[:, :, r0 - f0:r1 - f0].reshape(b_p, h, -1)
                gz1_a = gz1_a + torch.bmm(centred, gz1).sum(0)
                grad_p[:, :, r0:r1].view(b_p, h, -1).baddbmm_(w1f, gz1.transpose(1, 2))
            if not piece.whole:
                piece.scatter_(grad_a, grad_p, accumulate=True)
        del x1, n2, x2, gz2, gy, gy2, gh1, gz1, centred, n2_kept, gy3_kept, grad_p
        # bn1: gy1 = s1 (gz1 - mean(gz1)) - s1 r1 mean(gz1 n1) (W1 (a - mu)), n1 its normalised
        # input r1 W1 (a - mu); its sums follow from gz1_a = sum (a - mu) gz1^T (H, eH)
        acc = mean_a.dtype
        w1acc, s1acc, r1acc = w1m.to(acc), s1.to(acc), r1_.to(acc)
        gz1_a = gz1_a.t().to(acc)  # (eH, H)
        sum_gz1 = sum_gz1.to(acc)
        sum_gz1n1 = (gz1_a * w1acc).sum(1) * r1acc
        k1 = s1acc * r1acc * sum_gz1n1 / count
        grad_w1 = s1acc[:, None] * gz1_a - k1[:, None] * count * (w1acc @ cov_a)
        # (H, H) applied to the centred map (not to a, then minus mu: the maps are nearly
        # uniform, their mean would cancel in float32)
        correction = (-(w1acc.t() * k1) @ w1acc).to(a.dtype).expand(b, h, h)
        bias = correction[0] @ (mean_a.to(a.dtype) - center.view(h))
        bias = (bias - (w1acc.t() @ (s1acc * sum_gz1 / count)).to(a.dtype)).view(h, 1)
        for r0, r1 in chunks:
            centred = torch.sub(a[:, :, r0:r1], center, out=ws('centred', b, h, r1 - r0, n))
            grad_a[:, :, r0:r1].view(b, h, -1).baddbmm_(correction, centred.view(b, h, -1)
                                                       ).add_(bias)
        return (grad_a, None, grad_w1.to(a.dtype).view_as(w1), sum_gz1n1.to(a.dtype),
                sum_gz1.to(a.dtype), grad_w2, sum_gz2n2, sum_gz2, grad_w3.view_as(w3), grad_g3,
                grad_b3, grad_g4, grad_b4, None, None, None, None)


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
    the environment variable ``MMVIT_REFINER_IMPL``) and may be reassigned later.
    """

    def __init__(self, num_heads: int, expansion: int = 3, kernel_size: int = 3,
                 refiner_impl: Optional[str] = None):
        super().__init__()
        self.refiner_impl = resolve_refiner_impl(refiner_impl)
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

    def refine(self, attn: torch.Tensor, out_norm: nn.modules.batchnorm._BatchNorm,
               scale: float, mask: Optional[torch.Tensor] = None,
               windows: Optional[Tuple[Tuple[int, int], int]] = None) -> torch.Tensor:
        """``out_norm(self(attn, mask)) * scale``, zeroed where ``mask`` is False: (B, H, L, L).

        ``windows``: ``((h, w), window)`` when ``attn`` holds the maps of ``window_partition``'s
        windows of (h, w) token grids padded to whole windows and ``mask`` is their padding
        (``window_padding_mask``, as query and key pairs): the chunked paths then skip the
        padding's constant entries (see :func:`_padded_window_layout`).

        Under autograd the backward recomputes the expanded maps: besides ``attn`` (kept by the
        computing block anyway) at most one (B, H, L, L) map is kept, instead of ~15 map-sized
        tensors of the module formulation (what bounded the training memory).

        BatchNorms: BatchNorm2d, mmengine's ``_BatchNormXd`` and SyncBatchNorm outside a
        multi-process run take the chunked paths. A SyncBatchNorm that synchronises (training,
        several processes) takes the recomputed formulation with its statistics all-reduced
        (:func:`_sync_batch_norm`): it keeps ``attn`` and the mask as well, but its backward
        recomputes the whole expanded maps of the block at once (~15 map-sized tensors while
        one sharing block's backward runs). Running statistics are updated once per forward,
        never by a recomputation. BatchNorms with a forward of their own run module by module.
        """
        norms = (self.bn1, self.bn2, self.bn3, out_norm)
        train_norms = [bn for bn in norms if _uses_batch_stats(bn)]
        if refiner_impl_on(self.refiner_impl, attn.device) == 'reference':
            return self._refine_reference(attn, out_norm, scale, mask)
        chunk_elements = _chunk_elements(attn.device)
        layout = _WHOLE_MAPS
        if chunk_elements and windows is not None and mask is not None:
            layout = _padded_window_layout(*windows, len(attn),
                                           self.depth_sep_conv.kernel_size[0] // 2, attn.device)
        if len(train_norms) == len(norms) and self.depth_sep_conv.kernel_size[0] % 2 and all(
                _normalises_locally(bn) and bn.affine for bn in norms):
            out, *stats = _RefineWithBatchStats.apply(
                attn, mask, self.conv_exp.weight, self.bn1.weight, self.bn1.bias,
                self.depth_sep_conv.weight, self.bn2.weight, self.bn2.bias, self.conv_pro.weight,
                self.bn3.weight, self.bn3.bias, out_norm.weight, out_norm.bias,
                tuple(bn.eps for bn in norms), scale, chunk_elements, layout)
            _update_running_stats(norms, [
                stat for i, bn in enumerate(norms) if bn.track_running_stats
                for stat in stats[2 * i:2 * i + 2]])
            return out
        if not train_norms:
            fn = partial(self._refine_folded, out_norm=out_norm, scale=scale,
                         chunk_elements=chunk_elements, layout=layout)
        elif all(_normalises_locally(bn) or _synchronises(bn) for bn in train_norms):
            fn = partial(self._refine_batch_stats, out_norm=out_norm, scale=scale)
        else:  # BatchNorms with a forward of their own
            return self._refine_reference(attn, out_norm, scale, mask)
        if torch.is_grad_enabled() and (attn.requires_grad or
                                        any(p.requires_grad for p in self.parameters())):
            out, *batch_stats = cp.checkpoint(fn, attn, mask, use_reentrant=False,
                                              preserve_rng_state=False)
        else:
            out, *batch_stats = fn(attn, mask)
        _update_running_stats(train_norms, batch_stats)
        return out

    def _refine_reference(self, attn: torch.Tensor, out_norm: nn.modules.batchnorm._BatchNorm,
                          scale: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`refine` module by module: (B, H, L, L)."""
        out = out_norm(self(attn, mask)).mul_(scale)
        return out if mask is None else out.masked_fill_(~mask, 0.)

    def _refine_batch_stats(self, attn: torch.Tensor, mask: Optional[torch.Tensor],
                            out_norm: nn.modules.batchnorm._BatchNorm,
                            scale: float) -> List[torch.Tensor]:
        """:meth:`refine` for BatchNorms that (may) use batch statistics: the refined map, then
        the batch statistics for :func:`_update_running_stats`."""
        b, h, n, _ = attn.shape
        e = self.conv_exp.out_channels
        stats: List[torch.Tensor] = []
        # The 1x1 convs as matrix products over the head axis. The maps stay contiguous
        # (B, C, L, L): BatchNorm's and ReLU6's backward are slow on channels-last maps.
        x = torch.bmm(self.conv_exp.weight.view(e, h).expand(b, e, h), attn.reshape(b, h, n * n))
        x = _batch_norm(x.view(b, e, n, n), self.bn1, stats)
        if mask is not None:
            x.masked_fill_(~mask, 0.)
        x = self.depth_sep_conv(self.act(x))
        x = self.act(_batch_norm(x, self.bn2, stats))
        x = torch.bmm(self.conv_pro.weight.view(h, e).expand(b, h, e), x.reshape(b, e, n * n))
        x = _batch_norm(x.view(b, h, n, n), self.bn3, stats).add_(attn)
        x = _batch_norm(x, out_norm, stats).mul_(scale)
        if mask is not None:
            x.masked_fill_(~mask, 0.)
        return [x, *stats]

    def _refine_folded(self, attn: torch.Tensor, mask: Optional[torch.Tensor],
                       out_norm: nn.modules.batchnorm._BatchNorm, scale: float,
                       chunk_elements: Optional[int], layout: MapLayout) -> List[torch.Tensor]:
        """:meth:`refine` with every BatchNorm on running statistics, folded into the convs:
        ``relu6(W1 a + b1)``, ``relu6(dw(.) + b2)``, ``W3 (.) + k a + b3``, in chunks of query
        rows (with the depthwise conv's halo) so that the expanded maps never exist whole; on
        the pieces of ``layout`` (the output is masked to zero outside them)."""
        h = attn.shape[1]
        e = self.conv_exp.out_channels
        s1, t1 = _bn_scale_shift(self.bn1)
        s2, t2 = _bn_scale_shift(self.bn2)
        s3, t3 = _bn_scale_shift(self.bn3)
        s4, t4 = _bn_scale_shift(out_norm)
        w1 = (self.conv_exp.weight.view(e, h) * s1[:, None]).t()
        w2 = self.depth_sep_conv.weight * s2.view(e, 1, 1, 1)
        k = s4 * scale  # out_norm(bn3(y) + a) * scale = k * s3 * y + k * a + bias
        w3 = self.conv_pro.weight.view(h, e) * (k * s3)[:, None]
        b3 = (k * t3 + t4 * scale).view(h, 1)
        k = k.view(h, 1)
        kernel = self.depth_sep_conv.kernel_size[0]
        top, bottom = (kernel - 1) // 2, kernel // 2
        pieces = layout[0]
        keep = None if mask is None else mask.to(attn.dtype)
        out = None if pieces[0].whole else attn.new_zeros(attn.shape)
        for piece, a, keep_p, spans in _piece_maps(attn, keep, pieces, e, (top, bottom),
                                                   chunk_elements):
            b, _, _, n = a.shape
            chunks = []
            for r0, r1, i0, i1 in spans:
                # i0:i1 the rows that the depthwise conv reads
                x = torch.baddbmm(t1, a[:, :, i0:i1].reshape(b, h, -1).transpose(1, 2),
                                  w1.expand(b, h, e))
                # hardtanh, not clamp: ReLU6's gradient (zero at the bounds, where maps often
                # are)
                x = F.hardtanh(x, 0., 6., inplace=True).view(b, i1 - i0, n, e)
                if keep_p is not None:  # a float mask: broadcasting masked_fill_ is slow
                    x.mul_(keep_p[:, 0, i0:i1, :, None])
                x = F.conv2d(x.permute(0, 3, 1, 2), w2, t2, padding='same', groups=e)
                x = F.hardtanh(x[:, :, r0 - i0:r1 - i0], 0., 6., inplace=True)
                y = torch.addcmul(b3, a[:, :, r0:r1].reshape(b, h, -1), k)
                y = y.baddbmm_(w3.expand(b, h, e), x.reshape(b, e, -1))
                if keep_p is not None:
                    y.mul_(keep_p[:, :, r0:r1].reshape(b, 1, -1))
                chunks.append(y.view(b, h, r1 - r0, n))
            y = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
            if out is None:
                return [y]
            piece.scatter_(out, y)
        return [out]


class RefinedAttention(nn.Module):
    """Attention of a computing or a sharing Refiner block, global or windowed.

    Computing (``share=False``): ``a = softmax(q k^T * scale)``, plus ``scale * prev`` when a
    previous map is given; ``a`` is used and passed on. Sharing (``share=True``): only values are
    projected, ``a = adapt_bn(dla(prev)) * scale`` is used and ``prev`` is passed on unchanged.

    ``window_size=0``: global attention over (B, N, C) tokens (class token allowed), maps
    (B, heads, N, N). Otherwise the tokens are the (h, w) grid, padded to the window (padding
    masked out as keys and zeroed in the maps), maps (B * num_windows, heads, ws^2, ws^2).
    """

    def __init__(self, dim: int, num_heads: int, share: bool, window_size: int,
                 qkv_bias: bool = True, dla_expansion: int = 3, dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None):
        super().__init__()
        self.num_heads = num_heads
        self.share = share
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        if share:
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
            self.dla = DistributedLocalAttention(num_heads, dla_expansion, dla_kernel_size,
                                                 refiner_impl)
            self.adapt_bn = nn.BatchNorm2d(num_heads)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens, the previous map, the grid (h, w) -> (B, N, C), the map passed on."""
        if not self.window_size:
            out, attn = self._attend(x, prev, None)
            return self.proj(out), attn
        b, n, c = x.shape
        h, w = hw
        x = pad_to_multiple(x.view(b, h, w, c), self.window_size)
        hp, wp = x.shape[1:3]
        padding = window_padding_mask(hw, self.window_size, x.device)
        valid = None if padding is None else (~padding).repeat(b, 1)
        out, attn = self._attend(window_partition(x, self.window_size), prev, valid,
                                 (hw, self.window_size))
        out = crop_end(window_reverse(out, self.window_size, hp, wp), ((1, h), (2, w)))
        out = out.reshape(b, n, c)
        return self.proj(out), attn

    def _attend(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                valid: Optional[torch.Tensor], windows: Optional[Tuple[Tuple[int, int], int]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B', L, C) tokens, optional (B', L) real-token mask -> (B', L, C), the map passed on;
        ``windows``: the token grid and window side of windowed tokens (see ``refine``).

        Under autocast the maps (logits, softmax, refiner convs and BNs) stay in float32: the
        BNs normalise maps of nearly uniform probabilities, which would magnify 16-bit rounding
        (float32 maps more than halve the relative gradient error of a bf16 tiny model); the
        projections and the product with the values run in the compute dtype.
        """
        b, n, c = x.shape
        pairs = None if valid is None else valid[:, None, :, None] & valid[:, None, None, :]
        map_dtype = torch.float32 if output_dtype(x) != x.dtype else x.dtype
        if self.share:
            v = self.v(x).view(b, n, self.num_heads, -1).transpose(1, 2)
            with autocast_off(x.device):
                attn = self.dla.refine(prev.to(map_dtype), self.adapt_bn, self.scale, pairs,
                                       windows)
            passed = prev
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            with autocast_off(x.device):
                # The public code scales q and k by sqrt(scale) each: the same logits.
                attn = (q.to(map_dtype) * self.scale) @ k.to(map_dtype).transpose(-2, -1)
                if valid is not None:
                    # -inf on padding keys, in place (the logits are not kept for the
                    # backward); adding a (B', 1, 1, L) bias, not masked_fill_ with a
                    # broadcast mask (several times slower on the CPU, its backward too)
                    key_bias = torch.zeros_like(valid, dtype=attn.dtype)
                    attn.add_(key_bias.masked_fill_(~valid, float('-inf'))[:, None, None, :])
                attn = attn.softmax(dim=-1)
                if prev is not None:
                    attn = torch.add(attn, prev, alpha=self.scale)
            if valid is not None:  # padding queries: rows of zeros (the maps are finite)
                attn = attn * valid.to(attn.dtype)[:, None, :, None]
            passed = attn
        return (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c), passed


class RefinerMlp(nn.Module):
    """fc1 -> GELU -> fc2 -> learnable per-channel scale (init 1e-5): (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.scale_channel = nn.Parameter(torch.full((dim, ), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) * self.scale_channel


class RefinerBlock(nn.Module):
    """``y, a = attn(norm1(x/2), prev); x += y*2; x += mlp(norm2(x/2))*2`` (with drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, share: bool,
                 window_size: int, qkv_bias: bool = True, drop_path: float = 0.,
                 dla_expansion: int = 3, dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinedAttention(dim, num_heads, share, window_size, qkv_bias,
                                     dla_expansion, dla_kernel_size, refiner_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefinerMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x * ADJUST_RATIO), prev, hw)
        x = x + self.drop_path(y) / ADJUST_RATIO
        x = x + self.drop_path(self.mlp(self.norm2(x * ADJUST_RATIO))) / ADJUST_RATIO
        return x, attn


class ConvPatchEmbed(nn.Module):
    """The public CNN stem: (B, in, H, W) -> (B, C, ceil(H/16), ceil(W/16)).

    conv 7x7/2 + BN + ReLU, conv 3x3 + BN + ReLU (x2), conv 8x8/8. The image is zero padded at
    the bottom/right to a multiple of 16 so that no pixel is dropped.
    """

    def __init__(self, in_channels: int, embed_dims: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(128, embed_dims, PATCH_SIZE // 2, stride=PATCH_SIZE // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_end(x, ((2, pad_to(h, PATCH_SIZE)), (3, pad_to(w, PATCH_SIZE))))
        if _channels_last_on(x.device):
            # oneDNN's fast layout for these full-resolution convs (their backward is a large
            # part of a training step); the (B, C, h, w) output then flattens to tokens
            # without a copy
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        if _channels_last_on(x.device) and not torch.jit.is_tracing():
            return self._patchify(x)
        return self.proj(x)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``self.proj`` (kernel = stride) as one matrix product over the patches of the
        channels-last (B, C, H, W) map: (B, embed, H/k, W/k), channels-last. On the CPU its
        backward runs faster than the strided convolution's (oneDNN)."""
        b, c, h, w = x.shape
        k = self.proj.stride[0]
        patches = x.permute(0, 2, 3, 1).reshape(b, h // k, k, w // k, k, c).transpose(2, 3)
        patches = patches.reshape(b, (h // k) * (w // k), k * k * c)
        weight = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        out = F.linear(patches, weight, self.proj.bias)
        return out.view(b, h // k, w // k, -1).permute(0, 3, 1, 2)


def _default_global_blocks(num_layers: int) -> Tuple[int, ...]:
    """A quarter of the blocks, ViTDet-like: one (computing, sharing) pair per 8 blocks (at least
    one), each the last pair of an equal segment of the depth."""
    num_pairs = (num_layers + 1) // 2
    segments = max(num_layers // 8, 1)
    pairs = sorted({max((s + 1) * num_pairs // segments - 1, 0) for s in range(segments)})
    return tuple(i for pair in pairs for i in (2 * pair, 2 * pair + 1) if i < num_layers)


@MODELS.register_module()
class RefinerViT(PyramidBackbone):
    """Refiner-ViT with windowed/global refined attention and a simple feature pyramid.

    Blocks alternate: even blocks compute attention (adding ``scale`` times the previous
    computed map), odd blocks share it through the refiner. Windowed blocks attend within
    ``window_size`` x ``window_size`` windows of the token grid (padded to the window; padding
    never influences real tokens); blocks in ``global_attn_indexes`` attend over the whole
    grid, and their refiner convs run on the full N x N maps (memory grows with N^2, see
    docs/backbones/refiner_vit.md). Maps are passed on between blocks of the same kind; the
    first computing block after a change of kind starts a new chain.

    Args:
        arch: ``'small'``/``'s'``, ``'medium'``/``'m'``, ``'large'``/``'l'`` or a dict with
            ``embed_dims``, ``num_layers``, ``num_heads``, ``mlp_ratio``.
        in_channels: image channels.
        pretrain_img_size: image size of the position embedding (grid ``size // 16``); it is
            interpolated (bicubic) to the grid of every input.
        window_size: window of the windowed blocks, in tokens (14: the pretraining map size).
        global_attn_indexes: blocks with global attention: ``None`` (a quarter of the blocks:
            one pair per 8 blocks, evenly spaced, the last pair included), ``'all'`` (the public
            classification model), or a sequence of block indices; a sharing block and the
            computing block before it must be both listed or both not.
        with_cls_token: keep the class token (needs ``global_attn_indexes='all'``); it is
            dropped from the pyramid inputs.
        pyramid_block_indexes: for each of the 4 pyramid levels, the block whose output feeds
            it; default the last block for every level (ViTDet). Blocks after the last one
            feeding a level in ``out_indices`` are not built (they would get no gradient, which
            stops DDP without ``find_unused_parameters``); their checkpoint keys are skipped.
        qkv_bias, dla_expansion, dla_kernel_size: as the public models (True, 3, 3).
        refiner_impl: how the refiners compute, the same numbers either way: ``'fused'`` (the
            hand-written chunked passes: ~4 instead of ~15 map-sized tensors kept per sharing
            block in training), ``'reference'`` (module by module: plain convs and
            BatchNorms), ``'auto'`` (per device type, see docs/devices.md); None (default):
            the environment variable ``MMVIT_REFINER_IMPL``, else ``'auto'``. Decided when
            the model is built; assigning the attribute ``refiner_impl`` changes it.
        out_indices: pyramid levels returned (strides 4, 8, 16, 32), each after ``out_norm{i}``.
        frozen_stages: -1 (none) or k: freeze the patch embedding, position embedding (and
            class token) and the first k blocks; ``num_layers`` freezes every parameter
            (pyramid and output norms included).
        norm_eval: keep every BatchNorm (stem, refiner) in eval mode while training; needed
            for batch independence in training, since these BNs otherwise use batch statistics.
        with_cp: gradient checkpointing per block.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        use_ema: load ``state_dict_ema`` from pretrained checkpoints that have one.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` loads a public checkpoint through
            :meth:`convert_checkpoint`.
    """
    arch_zoo = {
        **dict.fromkeys(['s', 'small'],
                        dict(embed_dims=384, num_layers=16, num_heads=12, mlp_ratio=3.)),
        **dict.fromkeys(['m', 'medium'],
                        dict(embed_dims=420, num_layers=32, num_heads=12, mlp_ratio=3.)),
        **dict.fromkeys(['l', 'large'],
                        dict(embed_dims=512, num_layers=32, num_heads=16, mlp_ratio=3.)),
    }
    _keys_not_in_public_checkpoints = ('out_norm', 'pyramid')
    checkpoint_layouts = (
        KeyLayout('Refiner-ViT, public layout', r'^blocks\.\d+\.attn\.DLA\.',
                  r'^blocks\.(\d+)\.', 'patch_embed.proj.weight'),
        KeyLayout('Refiner-ViT, converted layout', r'^blocks\.\d+\.attn\.dla\.',
                  r'^blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    )

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 window_size: int = 14,
                 global_attn_indexes: Union[None, str, Sequence[int]] = None,
                 with_cls_token: bool = False,
                 pyramid_block_indexes: Optional[Sequence[int]] = None,
                 qkv_bias: bool = True,
                 dla_expansion: int = 3,
                 dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 drop_path_rate: float = 0.,
                 use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        arch = resolve_arch(arch, self.arch_zoo,
                            ('embed_dims', 'num_layers', 'num_heads', 'mlp_ratio'))
        embed_dims = check_int("arch['embed_dims']", arch['embed_dims'], low=1)
        num_layers = check_int("arch['num_layers']", arch['num_layers'], low=1)
        num_heads = check_int("arch['num_heads']", arch['num_heads'], low=1)
        super().__init__(in_channels, out_indices, frozen_stages, num_frozen_units=num_layers,
                         with_cp=with_cp, use_ema=use_ema, init_cfg=init_cfg)
        self.norm_eval = bool(norm_eval)
        check_heads([embed_dims], [num_heads])
        mlp_ratio = check_number("arch['mlp_ratio']", arch['mlp_ratio'], 0., math.inf,
                                 include_low=False)
        for name, value in (('pretrain_img_size', pretrain_img_size),
                            ('window_size', window_size), ('dla_expansion', dla_expansion),
                            ('dla_kernel_size', dla_kernel_size)):
            check_int(name, value, low=1)
        if pretrain_img_size % PATCH_SIZE:
            raise ValueError(f'pretrain_img_size={pretrain_img_size} is invalid; allowed values: '
                             f'multiples of the patch size {PATCH_SIZE}')
        check_probability('drop_path_rate', drop_path_rate)
        refiner_impl = resolve_refiner_impl(refiner_impl)
        global_blocks = self._check_global_blocks(global_attn_indexes, num_layers)
        if with_cls_token and len(global_blocks) != num_layers:
            raise ValueError("with_cls_token=True needs global_attn_indexes='all': windows hold "
                             'no class token')
        if pyramid_block_indexes is None:
            pyramid_block_indexes = (num_layers - 1, ) * 4
        self.pyramid_block_indexes = check_indices(
            'pyramid_block_indexes', pyramid_block_indexes, num_layers, 'block', unique=False)
        if len(self.pyramid_block_indexes) != len(PYRAMID_STRIDES):
            raise ValueError(f'pyramid_block_indexes={tuple(pyramid_block_indexes)} is invalid; '
                             'allowed values: 4 block indices, one per pyramid level')

        self.embed_dims = embed_dims
        self.num_layers = num_layers
        self.num_features = [embed_dims] * 4
        self._feature_blocks = sorted({self.pyramid_block_indexes[i] for i in self.out_indices})
        # where forward_tokens puts every output's tokens
        self._output_tokens = tuple(self._feature_blocks.index(self.pyramid_block_indexes[i])
                                    for i in self.out_indices)

        self.patch_embed = ConvPatchEmbed(in_channels, embed_dims)
        self.pos_grid = (pretrain_img_size // PATCH_SIZE, ) * 2
        self.num_extra_tokens = int(with_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims)) if with_cls_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_extra_tokens + self.pos_grid[0] * self.pos_grid[1],
                        embed_dims))
        rates = drop_path_rates(drop_path_rate, num_layers)
        # blocks after the last one feeding an output would get no gradient: not built
        self.blocks = nn.ModuleList([
            RefinerBlock(embed_dims, num_heads, mlp_ratio, share=i % 2 == 1,
                         window_size=0 if i in global_blocks else window_size,
                         qkv_bias=qkv_bias, drop_path=rates[i], dla_expansion=dla_expansion,
                         dla_kernel_size=dla_kernel_size, refiner_impl=refiner_impl)
            for i in range(self._feature_blocks[-1] + 1)
        ])
        self._refiner_impl = refiner_impl
        self.pyramid = SimpleFeaturePyramid(embed_dims, self.out_indices)
        self._add_out_norms(self.num_features, LayerNorm2d)
        self._finish_init()

    @property
    def refiner_impl(self) -> str:
        """The refiners' implementation (see ``refiner_impl`` in the class docs); assigning it
        (None: ``MMVIT_REFINER_IMPL``, else ``'auto'``) sets every refiner's."""
        return self._refiner_impl

    @refiner_impl.setter
    def refiner_impl(self, impl: Optional[str]) -> None:
        impl = self._refiner_impl = resolve_refiner_impl(impl)
        for block in self.blocks:
            if block.attn.share:
                block.attn.dla.refiner_impl = impl

    @staticmethod
    def _check_global_blocks(indexes: Union[None, str, Sequence[int]],
                             num_layers: int) -> Tuple[int, ...]:
        if indexes is None:
            return _default_global_blocks(num_layers)
        if isinstance(indexes, str):
            if indexes != 'all':
                raise ValueError(f"global_attn_indexes={indexes!r} is invalid; allowed values: "
                                 "None, 'all' or a sequence of block indices")
            return tuple(range(num_layers))
        blocks = set(check_indices('global_attn_indexes', indexes, num_layers, 'block',
                                   allow_empty=True))
        for share in range(1, num_layers, 2):
            if (share in blocks) != (share - 1 in blocks):
                raise ValueError(
                    f'global_attn_indexes={tuple(indexes)} is invalid: sharing block {share} '
                    f'reuses the map of block {share - 1}, so list both or neither')
        return tuple(sorted(blocks))

    def _init_extra_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)

    # -- pretrained weights -----------------------------------------------------------------
    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Public Refiner-ViT keys -> this module's (idempotent on converted checkpoints).

        Drops the classifier heads and final norm (and the class token unless
        ``with_cls_token``), renames ``attn.DLA`` -> ``attn.dla`` and the sharing blocks'
        value-only ``attn.qkv`` -> ``attn.v``, and resizes the position embedding to
        ``pretrain_img_size``.
        """
        converted, dropped = {}, []
        for key, value in state_dict.items():
            if key.startswith(_CLASSIFIER_KEYS) or (key == 'cls_token' and self.cls_token is None):
                dropped.append(key)
                continue
            key = key.replace('.attn.DLA.', '.attn.dla.')
            parts = key.split('.')
            if (parts[0] == 'blocks' and parts[1].isdigit() and int(parts[1]) < len(self.blocks)
                    and parts[2:4] == ['attn', 'qkv'] and self.blocks[int(parts[1])].attn.share):
                key = '.'.join(parts[:3] + ['v'] + parts[4:])
            converted[key] = value
        if 'pos_embed' in converted:
            converted['pos_embed'] = self._convert_pos_embed(converted['pos_embed'])
        if dropped:
            print_log(f'RefinerViT: dropped classification-only keys {dropped}', logger='current')
        return converted

    def _convert_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        """(1, extra + g*g, C) of a public checkpoint -> this model's (1, extra' + gh*gw, C)."""
        if pos_embed.shape == self.pos_embed.shape:
            return pos_embed
        num_tokens = pos_embed.shape[1]
        grid = math.isqrt(num_tokens)
        extra = num_tokens - grid * grid
        if extra not in (0, 1) or extra < self.num_extra_tokens:
            raise ValueError(f'checkpoint pos_embed {tuple(pos_embed.shape)} is not a square grid '
                             f'with {self.num_extra_tokens} class token')
        grid_embed = resample_abs_pos_embed(pos_embed[:, extra:], self.pos_grid, (grid, grid),
                                            num_prefix_tokens=0, antialias=False)
        return torch.cat([pos_embed[:, :self.num_extra_tokens], grid_embed], dim=1)

    def unbuilt_key_prefixes(self) -> Tuple[str, ...]:
        """The output norms and pyramid levels not in ``out_indices``, and the blocks after the
        last one feeding a level."""
        levels = [i for i in range(len(PYRAMID_STRIDES)) if i not in self.out_indices]
        return tuple([f'out_norm{i}.' for i in levels] + [f'pyramid.level{i}.' for i in levels]
                     + [f'blocks.{i}.' for i in range(len(self.blocks), self.num_layers)])

    # -- freezing ----------------------------------------------------------------------------
    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """The stem and embeddings, the first ``frozen_stages`` blocks; all blocks freeze the
        pyramid and the output norms too (nothing is left to train)."""
        embeddings = nn.ParameterList(
            [p for p in (self.pos_embed, self.cls_token) if p is not None])
        modules = [self.patch_embed, embeddings, *self.blocks[:frozen_stages]]
        if frozen_stages == self.num_layers:
            modules += [self.pyramid, *(getattr(self, f'out_norm{i}') for i in self.out_indices)]
        return modules

    # -- forward -----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """As every backbone's, and: in training, every refiner BatchNorm in training mode
        must see more than one value per channel (its batch statistics)."""
        super().check_input(x)
        if not self.training or x.shape[0] != 1:
            return
        h, w = (-(-size // PATCH_SIZE) for size in x.shape[-2:])
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if not (attn.share and attn.adapt_bn.training):
                continue
            ws = attn.window_size
            # maps (B', heads, L, L): one global map of the tokens, or one per window
            values = (h * w + self.num_extra_tokens)**2 if not ws else \
                -(-h // ws) * -(-w // ws) * ws**4
            if values == 1:
                raise ValueError(
                    f'RefinerViT in training mode got a batch of 1 image of '
                    f'{tuple(x.shape[-2:])} pixels: a {h}x{w} token grid gives the BatchNorm '
                    f'layers of the refiner in block {i} one value per channel, so there are no '
                    'batch statistics. Use norm_eval=True (BatchNorm layers in eval mode), a '
                    f'batch of more than 1 image, or images larger than {PATCH_SIZE}x'
                    f'{PATCH_SIZE} pixels (more than one token)')

    def forward_tokens(self, x: torch.Tensor, blocks: Optional[Sequence[int]] = None
                       ) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """(B, in_channels, H, W) -> the outputs of ``blocks`` (ascending block indices;
        default: the blocks feeding the returned levels) as (B, extra + h*w, C), class token
        first, and the token grid (h, w) = (ceil(H/16), ceil(W/16)). Blocks after the last
        one asked for do not run; blocks after the last one feeding an output are not built."""
        if blocks is None:
            blocks = self._feature_blocks
        elif blocks[-1] >= len(self.blocks):
            raise ValueError(f'blocks={tuple(blocks)} is invalid: blocks 0..{len(self.blocks) - 1} '
                             f'are built (the last one feeding out_indices={self.out_indices} '
                             f'through pyramid_block_indexes={self.pyramid_block_indexes})')
        self.check_input(x)
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_abs_pos_embed(self.pos_embed, (h, w), self.pos_grid,
                                     num_prefix_tokens=self.num_extra_tokens)
        outs, attn = [], None
        for i, block in enumerate(self.blocks):
            if i > blocks[-1]:
                break
            if i and not block.attn.share and \
                    block.attn.window_size != self.blocks[i - 1].attn.window_size:
                attn = None  # window maps and global maps differ in shape: a new chain starts
            if self.with_cp and x.requires_grad:
                x, attn = checkpoint(block, x, attn, (h, w))
            else:
                x, attn = block(x, attn, (h, w))
            if contains(blocks, i):
                outs.append(x)
        return outs, (h, w)

    def forward(self, x: torch.Tensor, norm: bool = True) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> one (B, embed_dims, ceil(H/s), ceil(W/s)) map per
        ``out_indices`` entry, s = 4 * 2**i, all in one dtype (autocast's under it);
        ``norm=False`` leaves out the ``out_norm{i}`` (timm's ``forward_intermediates``).

        The token grid covers the image padded to a multiple of 16; every level is cropped to
        the maps of the real pixels, as the hierarchical backbones give."""
        self.check_input(x)
        dtype, size = output_dtype(x), x.shape[-2:]
        tokens, (h, w) = self.forward_tokens(x)
        feats = []
        for i in self._output_tokens:
            t = tokens[i][:, self.num_extra_tokens:]
            if _channels_last_on(x.device):
                # a channels-last view, no copy: the pyramid's transposed convs and norms run
                # faster on it (oneDNN), with the same numbers
                feats.append(t.reshape(t.shape[0], h, w, self.embed_dims).permute(0, 3, 1, 2))
            else:
                feats.append(t.transpose(1, 2).reshape(t.shape[0], self.embed_dims, h, w))
        outs = []
        # the levels as constants of range() (dynamo may make the ints of out_indices symbolic)
        levels = [i for i in range(len(PYRAMID_STRIDES)) if contains(self.out_indices, i)]
        for i, out in zip(levels, self.pyramid(feats)):
            stride = PYRAMID_STRIDES[i]
            if norm:
                out = getattr(self, f'out_norm{i}')(out)
            out = crop_end(out, ((2, ceil_div(size[0], stride)), (3, ceil_div(size[1], stride))))
            outs.append(out.contiguous().to(dtype))
        return tuple(outs)
