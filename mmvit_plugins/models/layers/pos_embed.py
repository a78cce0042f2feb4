"""Absolute position embeddings resized to the token grid of every input."""
from typing import Tuple

import torch

from .policy import Size, is_concrete
from .resample import bicubic_weights


def resize_abs_pos_embed(pos_embed: torch.Tensor, new_size: Tuple[Size, Size],
                         old_size: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """(1, prefix + h0*w0, C) -> (1, prefix + h*w, C): the grid part resized bicubically, the
    prefix (class) tokens kept.

    The values of ``F.interpolate(mode='bicubic', align_corners=False)`` (timm's
    ``resample_abs_pos_embed``), computed as two products with fixed :func:`bicubic_weights`
    matrices, in float32 for 16-bit embeddings: their backward is deterministic on every
    device (the bicubic interpolation's backward on CUDA is not, and raises under
    ``torch.use_deterministic_algorithms(True)``), and exported graphs resize for any size.
    A symbolic or traced size is always resized; an int size equal to the old one returns the
    embedding unchanged (the weights would be the identity).
    """
    h, w = new_size
    if is_concrete(h, w) and (h, w) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    rows = bicubic_weights(old_size[0], h, pos_embed.device, dtype)
    cols = bicubic_weights(old_size[1], w, pos_embed.device, dtype)
    channels = grid.shape[-1]
    # (h0, w0 * C) -> (h, w0 * C) -> (h, w0, C) -> (h, w, C)
    grid = rows @ grid.reshape(old_size[0], old_size[1] * channels).to(dtype)
    grid = cols @ grid.reshape(h, old_size[1], channels)
    return torch.cat([prefix, grid.reshape(1, h * w, channels).to(pos_embed.dtype)], dim=1)
