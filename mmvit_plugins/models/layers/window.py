"""Windows of (B, H, W, C) maps: padding to whole windows, partitioning, the padded-token mask,
and the attention mask that hides padding (and, for shifted windows, other regions) from real
tokens."""
from typing import Optional, Tuple, Union

import torch

from .capture import Size, is_concrete, pad_end, pad_to, size_cache

Window = Union[int, Tuple[int, int]]


def _pair(window: Window) -> Tuple[int, int]:
    return (window, window) if isinstance(window, int) else tuple(window)


def pad_to_multiple(x: torch.Tensor, multiple: Window, value: float = 0.) -> torch.Tensor:
    """Pad a (B, H, W, C) map at the bottom/right so that H and W are multiples of ``multiple``."""
    mh, mw = _pair(multiple)
    h, w = x.shape[1:3]
    return pad_end(x, ((1, pad_to(h, mh)), (2, pad_to(w, mw))), value)


def window_partition(x: torch.Tensor, window: Window) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, wh * ww, C); H, W must be multiples of the window."""
    wh, ww = _pair(window)
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Window, h: int, w: int) -> torch.Tensor:
    """(B * num_windows, wh * ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    wh, ww = _pair(window)
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // wh) * (w // ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _padding_map(hw: Tuple[Size, Size], window: Tuple[int, int],
                 device: torch.device) -> torch.Tensor:
    """(Hp, Wp) bool: the (H, W) map padded to whole windows, True where
    :func:`pad_to_multiple` added a token."""
    (h, w), (mh, mw) = hw, window
    rows = torch.arange(h + pad_to(h, mh), device=device) >= h
    cols = torch.arange(w + pad_to(w, mw), device=device) >= w
    return rows[:, None] | cols[None, :]


def _needs_no_mask(hw: Tuple[Size, Size], window: Tuple[int, int], shift_size: int = 0) -> bool:
    """Nothing is padded or shifted: known only for int sizes (a captured graph with symbolic
    sizes always builds the mask)."""
    (h, w), (mh, mw) = hw, window
    return not shift_size and is_concrete(h, w) and h % mh == 0 and w % mw == 0


@size_cache(maxsize=64)
def window_padding_mask(hw: Tuple[Size, Size], window: Window,
                        device: torch.device) -> Optional[torch.Tensor]:
    """(num_windows, wh * ww) bool, True for the tokens that :func:`pad_to_multiple` adds to an
    (H, W) map, in :func:`window_partition` order; ``None`` when the map needs no padding.
    Cached for int sizes: a stage's blocks, and every forward at the size, share it."""
    window = _pair(window)
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
    return mask.masked_fill(is_padding[:, None, :] != is_padding[:, :, None], float('-inf'))


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
    return x[:, :h, :w]
