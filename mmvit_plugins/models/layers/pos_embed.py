"""Absolute position embeddings resized to the token grid of every input."""
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .capture import Size, is_concrete


def resize_abs_pos_embed(pos_embed: torch.Tensor, new_size: Tuple[Size, Size],
                         old_size: Tuple[int, int], num_prefix_tokens: int = 0,
                         mode: str = 'bicubic') -> torch.Tensor:
    """(1, prefix + h0*w0, C) -> (1, prefix + h*w, C): the grid part interpolated (no
    antialiasing), the prefix (class) tokens kept; timm's ``resample_abs_pos_embed`` for int
    sizes. A symbolic or traced size is always interpolated (timm skips square grids with the
    old token count by a Python branch, which a traced graph would freeze at the export size);
    at the old size the interpolation is the identity."""
    h, w = new_size
    if is_concrete(h, w):
        return resample_abs_pos_embed(pos_embed, [h, w], list(old_size),
                                      num_prefix_tokens=num_prefix_tokens,
                                      interpolation=mode, antialias=False)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode=mode, align_corners=False)
    grid = grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
