"""Windows of (B, H, W, C) maps: padding to whole windows, partitioning, the padded-token mask,
and the attention mask that hides padding (and, for shifted windows, other regions) from real
tokens."""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Window = Union[int, Tuple[int, int]]


def _pair(window: Window) -> Tuple[int, int]:
    return (window, window) if isinstance(window, int) else tuple(window)


def pad_to_multiple(x: torch.Tensor, multiple: Window, value: float = 0.) -> torch.Tensor:
    """Pad a (B, H, W, C) map at the bottom/right so that H and W are multiples of ``multiple``."""
    mh, mw = _pair(multiple)
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % mh, -w % mw
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=value)
    return x


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


def window_padding_mask(hw: Tuple[int, int], window: Window,
                        device: torch.device) -> Optional[torch.Tensor]:
    """(num_windows, wh * ww) bool, True for the tokens that :func:`pad_to_multiple` adds to an
    (H, W) map, in :func:`window_partition` order; ``None`` when the map needs no padding."""
    mh, mw = _pair(window)
    h, w = hw
    if h % mh == 0 and w % mw == 0:
        return None
    padding = torch.ones(1, h + -h % mh, w + -w % mw, 1, dtype=torch.bool, device=device)
    padding[:, :h, :w] = False
    return window_partition(padding, (mh, mw)).squeeze(-1)


def window_attention_mask(hw: Tuple[int, int], window: Window, shift_size: int = 0,
                          device: torch.device = torch.device('cpu')) -> Optional[torch.Tensor]:
    """Additive (num_windows, wh*ww, wh*ww) float mask for attention inside the windows of an
    (H, W) map padded to whole windows and rolled by ``-shift_size``; None when nothing is masked.

    Real tokens never see padding, nor padding real tokens (-inf: every token still sees itself,
    so no softmax row is fully masked and no dtype gives NaN). With a shift, real tokens of
    different shifted-window regions are kept apart by -100, as in Swin and its checkpoints.
    A padded query attends only to padding: its output is zero (zero values), never
    e^-100-weighted real values, which are subnormal floats that slow every later CPU matmul.
    """
    (h, w), (wh, ww) = hw, _pair(window)
    hp, wp = h + -h % wh, w + -w % ww
    if not shift_size and (hp, wp) == (h, w):
        return None
    region = torch.zeros(hp, wp, device=device)
    if shift_size:
        rows = (slice(0, -wh), slice(-wh, -shift_size), slice(-shift_size, None))
        cols = (slice(0, -ww), slice(-ww, -shift_size), slice(-shift_size, None))
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                region[r, c] = 3 * i + j
    padding = torch.ones(hp, wp, dtype=torch.bool, device=device)
    padding[:h, :w] = False
    padding = torch.roll(padding, (-shift_size, -shift_size), (0, 1))
    region = region.masked_fill(padding, -1).view(1, hp, wp, 1)
    region = window_partition(region, (wh, ww)).squeeze(-1)
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
