"""A simple feature pyramid for plain (single-stride) ViTs, after ViTDet.

One stride-16 map per level becomes a map of stride 4 (two 2x2 transposed convs), 8 (one),
16 (identity) or 32 (2x2 max pooling). Every level keeps the input width, so a plain ViT with
``embed_dims`` channels offers ``num_features == [embed_dims] * 4`` like a hierarchical backbone.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from torch import nn

from .shapes import pad_end, pad_to

PYRAMID_STRIDES = (4, 8, 16, 32)


class CeilMaxPool2d(nn.Module):
    """2x2 max pooling that keeps the last row/column of an odd-sized map, as ``nn.MaxPool2d``
    with ``ceil_mode=True``: (B, C, h, w) -> (B, C, ceil(h / 2), ceil(w / 2)).

    The map is padded to even sizes with -inf first (the same maxima): ``ceil_mode``'s output
    size branches on the parity of the input, which would specialise a graph with dynamic
    shapes on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_end(x, ((-2, pad_to(h, 2)), (-1, pad_to(w, 2))), float('-inf'))
        return F.max_pool2d(x, kernel_size=2, stride=2)


def _make_level(level: int, channels: int) -> nn.Module:
    if level == 0:
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            LayerNorm2d(channels, eps=1e-6),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    if level == 1:
        return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
    if level == 2:
        return nn.Identity()
    return CeilMaxPool2d()


class SimpleFeaturePyramid(BaseModule):
    """Strides 4/8/16/32 from stride-16 maps of a plain ViT.

    Args:
        channels: width of the input maps and of every output level.
        levels: the pyramid levels to build (0: stride 4 ... 3: stride 32); only these hold
            parameters, as ``level{i}``.

    ``forward`` takes one (B, C, h, w) stride-16 map per built level (they may come from
    different blocks) and returns, per level ``i``, a (B, C, h * 4 / 2**i, w * 4 / 2**i) map
    (stride 32: ``ceil(h / 2)``).
    """

    def __init__(self, channels: int, levels: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if not levels or any(level not in range(len(PYRAMID_STRIDES)) for level in levels):
            raise ValueError(f'levels={tuple(levels)} is invalid; allowed values: a non-empty '
                             f'subset of {tuple(range(len(PYRAMID_STRIDES)))}')
        self.levels = tuple(levels)
        # names, not ints, for the forward: dynamo may make int attributes symbolic
        self._level_names = tuple(f'level{level}' for level in self.levels)
        for level, name in zip(self.levels, self._level_names):
            self.add_module(name, _make_level(level, channels))

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.levels):
            raise ValueError(f'expected {len(self.levels)} stride-16 maps (one per level '
                             f'{self.levels}), got {len(feats)}')
        return [getattr(self, name)(feat) for name, feat in zip(self._level_names, feats)]
