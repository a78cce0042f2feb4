"""BatchNorm semantics and moment arithmetic shared by the refiner's paths: which statistics a
BatchNorm uses, BatchNorm without touching its buffers (the statistics handed back instead),
running-statistics updates, and chunk-wise means, variances and channel sums."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..policy import accumulation_dtype

BatchNorm = nn.modules.batchnorm._BatchNorm
# (count, mean, biased variance) of some values, per channel
Moments = Tuple[int, torch.Tensor, torch.Tensor]


def uses_batch_stats(bn: BatchNorm) -> bool:
    """Whether ``bn`` normalises with the statistics of its input (as its forward decides)."""
    return bn.training or bn.running_mean is None


def bn_scale_shift(bn: BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm that uses its running statistics as ``x * scale + shift``, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def synchronises(bn: BatchNorm) -> bool:
    """Whether ``bn`` is a SyncBatchNorm that reduces its batch statistics over processes (as
    its forward decides: in training, with more than one process in its group)."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1)


def normalises_locally(bn: BatchNorm) -> bool:
    """Whether ``bn``'s forward is ``F.batch_norm`` on its input (BatchNorm2d, mmengine's
    ``_BatchNormXd``, a SyncBatchNorm that does not synchronise), which the refiner's fast
    paths compute themselves."""
    if isinstance(bn, nn.SyncBatchNorm):
        return not synchronises(bn)
    return type(bn).forward is BatchNorm.forward


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


def batch_norm(x: torch.Tensor, bn: BatchNorm, batch_stats: List[torch.Tensor]) -> torch.Tensor:
    """``bn(x)`` without touching ``bn``'s buffers: where ``bn`` would update its running
    statistics, the batch mean and unbiased variance are appended to ``batch_stats`` instead
    (:func:`update_running_stats` applies them), so that a recomputation is free of effects.
    A synchronising SyncBatchNorm reduces the statistics over its processes."""
    if synchronises(bn):
        return _sync_batch_norm(x, bn, batch_stats)
    if not uses_batch_stats(bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.,
                            bn.eps)
    if not (bn.training and bn.track_running_stats):
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0., bn.eps)
    # momentum 1: the "running" buffers receive exactly the batch statistics
    mean, var = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
    batch_stats += [mean, var]
    return F.batch_norm(x, mean, var, bn.weight, bn.bias, True, 1., bn.eps)


@torch.no_grad()
def update_running_stats(bns: Sequence[BatchNorm], batch_stats: Sequence[torch.Tensor]) -> None:
    """What ``bn.forward`` does to the buffers in training, from the batch means and unbiased
    variances (two per BatchNorm that tracks running statistics in training, in order)."""
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


def moments(x: torch.Tensor, dim: Tuple[int, ...], tmp: Optional[torch.Tensor] = None
            ) -> Moments:
    """(count, mean, biased variance) of ``x`` over ``dim``, two-pass (``torch.var_mean`` is
    several times slower on the CPU); ``tmp``: a buffer of ``x``'s shape for the squares."""
    mean = x.mean(dim=dim)
    shape = [x.shape[i] if i not in dim else 1 for i in range(x.dim())]
    var = torch.sub(x, mean.view(shape), out=tmp).square_().mean(dim=dim)
    return x.numel() // mean.numel(), mean, var


def tile(v: torch.Tensor, n: int) -> torch.Tensor:
    """Per-channel values (C,) -> (n, C), to broadcast over channels-last (..., n, C) maps: the
    CPU kernels then run one contiguous loop over n * C elements instead of n short loops over
    C."""
    return v.repeat(n).view(n, -1)


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of a channels-last (..., n, C) map whose last two dims are contiguous
    (summed as n * C columns first, faster on the CPU than over C columns): (C,)."""
    return x.flatten(-2).sum(dim=tuple(range(x.dim() - 2))).view(x.shape[-2], -1).sum(0)


def channel_moments(x: torch.Tensor, tmp: Optional[torch.Tensor] = None) -> Moments:
    """(count, mean, biased variance) per channel of a channels-last map, as :func:`moments`
    over all dims but the last."""
    count = x.numel() // x.shape[-1]
    mean = channel_sums(x) / count
    var = channel_sums(torch.sub(x, tile(mean, x.shape[-2]), out=tmp).square_()) / count
    return count, mean, var


def merge_moments(chunks: List[Moments]) -> Moments:
    """(count, mean, biased variance) of chunks -> of their union (Chan et al.), in float64
    where the device has it."""
    count, mean, m2 = 0, 0., 0.
    for n, chunk_mean, chunk_var in chunks:
        dtype = accumulation_dtype(chunk_mean.device)
        chunk_mean, chunk_var = chunk_mean.to(dtype), chunk_var.to(dtype)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_var * n + delta.square() * (count * n / total)
        count = total
    return count, mean, m2 / count
