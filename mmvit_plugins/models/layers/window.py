"""Windows of (B, H, W, C) maps: padding to whole windows, partitioning, the padded-token mask,
and the attention mask that hides padding (and, for shifted windows, other regions) from real
tokens.

A window is an int (square) or (height, width), where ``None`` is the whole extent of the map
(CSWin's stripes): nothing is padded along that side and it holds one window. The side is then
the map's size, also where that is symbolic, without padding arithmetic on it (``pad_to(w, w)``
is 0, but a graph with dynamic shapes would carry ``(2 * w - 1) // w`` through every shape).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .policy import Size, is_concrete
from .shapes import crop_end, pad_end, pad_to, size_cache

Window = Union[int, Tuple[Optional[int], Optional[int]]]


def _pair(window: Window) -> Tuple[Optional[int], Optional[int]]:
    return (window, window) if isinstance(window, int) else tuple(window)


def window_extent(window: Window, hw: Tuple[Size, Size]) -> Tuple[Size, Size]:
    """(height, width) of the windows on an (H, W) map, ``None`` sides resolved to the map's."""
    return tuple(size if side is None else side for side, size in zip(_pair(window), hw))


def _counts(window: Window, hw: Tuple[Size, Size]) -> List[Size]:
    """Windows along H and W of a map of whole windows."""
    return [1 if side is None else size // side for side, size in zip(_pair(window), hw)]


def window_count(window: Window, hw: Tuple[Size, Size]) -> Size:
    """Windows of an (H, W) map of whole windows, per image."""
    rows, cols = _counts(window, hw)
    return rows * cols


def _pads(window: Window, hw: Tuple[Size, Size], first_dim: int) -> Sequence[Tuple[int, Size]]:
    """:func:`~.shapes.pad_end`'s (dim, pad) for the sides that are padded to whole windows."""
    return tuple((first_dim + i, pad_to(size, side))
                 for i, (side, size) in enumerate(zip(_pair(window), hw)) if side is not None)


def pad_to_multiple(x: torch.Tensor, multiple: Window, value: float = 0.) -> torch.Tensor:
    """Pad a (B, H, W, C) map at the bottom/right so that H and W are multiples of ``multiple``."""
    return pad_end(x, _pads(multiple, x.shape[1:3], 1), value)


def window_partition(x: torch.Tensor, window: Window) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, wh * ww, C); H, W must be multiples of the window."""
    b, h, w, c = x.shape
    (wh, ww), (nh, nw) = window_extent(window, (h, w)), _counts(window, (h, w))
    x = x.view(b, nh, wh, nw, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Window, h: Size, w: Size) -> torch.Tensor:
    """(B * num_windows, wh * ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    (wh, ww), (nh, nw) = window_extent(window, (h, w)), _counts(window, (h, w))
    c = windows.shape[-1]
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _padding_map(hw: Tuple[Size, Size], window: Window, device: torch.device) -> torch.Tensor:
    """(Hp, Wp) bool: the (H, W) map padded to whole windows, True where
    :func:`pad_to_multiple` added a token."""
    pads = dict(_pads(window, hw, 0))
    rows, cols = (torch.arange(size + pads.get(i, 0), device=device) >= size
                  for i, size in enumerate(hw))
    return rows[:, None] | cols[None, :]


def _needs_no_mask(hw: Tuple[Size, Size], window: Window, shift_size: int = 0) -> bool:
    """Nothing is padded or shifted: known only for int sizes (a captured graph with symbolic
    sizes always builds the mask)."""
    return (not shift_size and is_concrete(*hw)
            and all(side is None or size % side == 0 for side, size in zip(_pair(window), hw)))


@size_cache(maxsize=64)
def window_padding_mask(hw: Tuple[Size, Size], window: Window,
                        device: torch.device) -> Optional[torch.Tensor]:
    """(num_windows, wh * ww) bool, True for the tokens that :func:`pad_to_multiple` adds to an
    (H, W) map, in :func:`window_partition` order; ``None`` when the map needs no padding.
    Cached for int sizes: a stage's blocks, and every forward at the size, share it."""
    if _needs_no_mask(hw, window):
        return None
    padding = _padding_map(hw, window, device)
    return window_partition(padding[None, :, :, None], window).squeeze(-1)


def _shift_regions(size: Size, window: int, shift_size: int, device: torch.device) -> torch.Tensor:
    """(size,) Swin's shifted-window region of every row (or column) of a padded map: 0 before
    its last window, 1 in the last window before the shift, 2 in the last ``shift_size``."""
    index = torch.arange(size, device=device)
    return (index >= size - window).long() + (index >= size - shift_size).long()


@size_cache(maxsize=64)
def window_attention_mask(hw: Tuple[Size, Size], window: Window, shift_size: int = 0,
                          device: torch.device = torch.device('cpu')) -> Optional[torch.Tensor]:
    """Additive (num_windows, wh*ww, wh*ww) float mask for attention inside the windows of an
    (H, W) map padded to whole windows and rolled by ``-shift_size``; None when nothing is masked.

    Real tokens never see padding, nor padding real tokens (-inf: every token still sees itself,
    so no softmax row is fully masked and no dtype gives NaN). With a shift, real tokens of
    different shifted-window regions are kept apart by -100, as in Swin and its checkpoints.
    A padded query attends only to padding: its output is zero (zero values), never
    e^-100-weighted real values, which are subnormal floats that slow every later CPU matmul.
    """
    window = _pair(window)
    if _needs_no_mask(hw, window, shift_size):
        return None
    padding = _padding_map(hw, window, device)
    hp, wp = padding.shape
    if shift_size:
        region = (3 * _shift_regions(hp, window[0], shift_size, device)[:, None]
                  + _shift_regions(wp, window[1], shift_size, device)[None, :])
    else:
        region = torch.zeros(hp, wp, dtype=torch.long, device=device)
    padding = torch.roll(padding, (-shift_size, -shift_size), (0, 1))
    region = region.masked_fill(padding, -1)[None, :, :, None]
    region = window_partition(region, window).squeeze(-1)
    mask = (region[:, None, :] != region[:, :, None]).float() * -100.
    is_padding = region < 0
    # an exclusive or of the flags: torch 2.4's inductor fails on comparing two bool tensors
    return mask.masked_fill(is_padding[:, None, :] ^ is_padding[:, :, None], float('-inf'))


def attend_in_windows(attention: torch.nn.Module, x: torch.Tensor, window: Window,
                      shift_size: int = 0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run a window attention ``attention(windows, mask)`` over a (B, H, W, C) map: pad to whole
    windows, roll by ``-shift_size``, attend, undo both; returns (B, H, W, C).

    ``mask``: :func:`window_attention_mask` of the map (and shift), or None.
    """
    h, w = x.shape[1:3]
    x = pad_to_multiple(x, window)
    hp, wp = x.shape[1:3]
    if shift_size:
        x = torch.roll(x, (-shift_size, -shift_size), (1, 2))
    x = window_reverse(attention(window_partition(x, window), mask), window, hp, wp)
    if shift_size:
        x = torch.roll(x, (shift_size, shift_size), (1, 2))
    return crop_end(x, ((1, h), (2, w)))
