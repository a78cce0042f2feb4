"""Adaptive average pooling as two matrix products, exact for every input and output size and
traceable with dynamic sizes (ONNX ``Range``/``MatMul``), for deployment.

PyTorch's ``adaptive_avg_pool2d`` averages, for output row ``i`` of ``o`` rows over an input of
``n`` rows, the rows ``floor(i * n / o) .. ceil((i + 1) * n / o) - 1``; columns likewise. The
bins of each axis form an ``(o, n)`` averaging matrix ``A``, and ``out = A_h @ x @ A_w^T``.
Both matrices are built from the input's sizes with tensor operations, so a traced graph
computes the bins of whatever size it is run at.
"""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from mmvit_plugins.models.layers.resample import resample_weights

SizeLike = Union[int, Tensor]


def adaptive_bins(size: SizeLike, out_size: int, dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = 'cpu') -> Tensor:
    """The ``(out_size, size)`` matrix that averages each adaptive bin of one axis: the
    ``'area'`` weights of :func:`~mmvit_plugins.models.layers.resample_weights`, which
    MAFormer's GLD uses too.

    Args:
        size: the input length (an int, or a 0-dim tensor while tracing).
        out_size: the output length (>= 1; may exceed ``size``: bins then overlap).
    """
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f'out_size={out_size!r} must be an int >= 1')
    return resample_weights(size, out_size, 'area', torch.device(device), dtype)


def exact_adaptive_avg_pool2d(x: Tensor,
                              output_size: Union[int, None, Sequence[Optional[int]]]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` for ``(N, C, H, W)`` or ``(C, H, W)`` inputs.

    ``None`` in ``output_size`` keeps that axis, as in PyTorch. Returns ``(..., out_h, out_w)``
    in ``x``'s dtype.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f'x must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}')
    out_h, out_w = _pair(output_size)
    if out_h is not None:
        x = torch.matmul(adaptive_bins(x.shape[-2], int(out_h), x.dtype, x.device), x)
    if out_w is not None:
        cols = adaptive_bins(x.shape[-1], int(out_w), x.dtype, x.device)
        x = torch.matmul(x, cols.transpose(0, 1))
    return x
