"""Resampling a map of any size to a fixed grid as two matrix products, the way torch's
antialiased bilinear interpolation and adaptive average pooling compute it.

The weights are built from the sizes with tensor operations, so compiled graphs keep the input
size symbolic and exported (ONNX) graphs serve every size: ``F.interpolate(antialias=True)``
has no ONNX operator, and ``F.adaptive_avg_pool2d`` exports only for one input size.
"""
from typing import Tuple

import torch

from .capture import Size

RESAMPLE_MODES = ('bilinear', 'area')


def resample_weights(in_size: Size, out_size: int, mode: str, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out_size, in_size) weights of one axis; rows sum to 1.

    ``'bilinear'``: torch's antialiased bilinear filter (``align_corners=False``): a triangle of
    half-width ``max(scale, 1)`` (``scale = in / out``) around each output pixel's centre, its
    weights normalised; ``'area'``: the mean over ``[floor(i * in / out), ceil((i + 1) * in /
    out))``, as adaptive average pooling.
    """
    index = torch.arange(out_size, device=device)
    source = torch.arange(in_size, device=device)
    if mode == 'area':
        start = index * in_size // out_size
        end = ((index + 1) * in_size + out_size - 1) // out_size
        weights = ((source >= start[:, None]) & (source < end[:, None])).to(dtype)
    elif mode == 'bilinear':
        # float64 positions: the same weights as torch's kernel for large maps too
        scale = torch.ones((), dtype=torch.float64, device=device) * in_size / out_size
        support = scale.clamp(min=1.)
        centre = (index.double() + 0.5) * scale
        offset = (source.double()[None, :] + 0.5 - centre[:, None]) / support
        weights = (1. - offset.abs()).clamp(min=0.).to(dtype)
    else:
        raise ValueError(f'mode={mode!r} is invalid; allowed values: {RESAMPLE_MODES}')
    return weights / weights.sum(1, keepdim=True)


def resample_to_grid(x: torch.Tensor, size: Tuple[int, int],
                     mode: str = 'bilinear') -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size[0], size[1]) by :func:`resample_weights` on both axes, in
    x's dtype."""
    rows = resample_weights(x.shape[-2], size[0], mode, x.device, x.dtype)
    cols = resample_weights(x.shape[-1], size[1], mode, x.device, x.dtype)
    return rows @ (x @ cols.t())
