"""Patch merging between stages and position-embedding resizing."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_channels).

    Odd sizes are zero-padded. Channel order of the 2x2 neighbours is the public Swin one
    (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) so its checkpoints load as is.
    Keys: ``norm`` (LayerNorm(4C)), ``reduction`` (Linear(4C, out, bias=False)).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


def resize_pos_embed(pos_embed: torch.Tensor, src_shape: Tuple[int, int],
                     dst_shape: Tuple[int, int], num_extra_tokens: int = 0,
                     mode: str = 'bicubic') -> torch.Tensor:
    """Resample a (1, extra + Hs*Ws, C) position embedding to (1, extra + Hd*Wd, C).

    The first ``num_extra_tokens`` (class/distillation tokens) are kept as they are.
    """
    if tuple(src_shape) == tuple(dst_shape):
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    hs, ws = src_shape
    if grid.shape[1] != hs * ws:
        raise ValueError(f'position embedding has {grid.shape[1]} grid tokens, '
                         f'src_shape={tuple(src_shape)} needs {hs * ws}')
    grid = grid.reshape(1, hs, ws, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(dst_shape), mode=mode,
                         align_corners=False).to(pos_embed.dtype)
    grid = grid.flatten(2).transpose(1, 2)
    return torch.cat([extra, grid], dim=1)
