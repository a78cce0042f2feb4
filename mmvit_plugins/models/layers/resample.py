"""Resampling a map of any size to a fixed grid as two matrix products, the way torch's
antialiased bilinear interpolation and adaptive average pooling compute it.

The weights are built from the sizes with tensor operations, so compiled graphs keep the input
size symbolic and exported (ONNX) graphs serve every size: ``F.interpolate(antialias=True)``
has no ONNX operator, and ``F.adaptive_avg_pool2d`` exports only for one input size.
"""
from typing import Tuple

import torch

from .policy import Size

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


# torch's bicubic convolution constant (upsample_bicubic2d, OpenCV's)
_CUBIC_A = -0.75


def _cubic_near(x: torch.Tensor) -> torch.Tensor:
    """The cubic convolution kernel for |x| <= 1."""
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:
    """The cubic convolution kernel for 1 < |x| < 2."""
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def bicubic_weights(in_size: int, out_size: Size, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out_size, in_size) weights of one axis of ``F.interpolate(mode='bicubic',
    align_corners=False)`` without antialiasing: source position ``(i + 0.5) * in / out - 0.5``,
    the four taps around it with the cubic convolution kernel (a = -0.75), taps outside the
    input read its border (as torch, in float64 positions)."""
    index = torch.arange(out_size, device=device, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64, device=device) * in_size / out_size
    position = (index + 0.5) * scale - 0.5
    start = position.floor().clamp(max=in_size - 1)
    t = (position - start).clamp(0., 1.)
    taps = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    source = torch.arange(in_size, device=device, dtype=torch.float64)
    weights = torch.zeros((), dtype=torch.float64, device=device)
    for offset, tap in zip((-1, 0, 1, 2), taps):
        column = (start + offset).clamp(0, in_size - 1)
        weights = weights + tap[:, None] * (source[None, :] == column[:, None])
    return weights.to(dtype)
