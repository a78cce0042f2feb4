"""Padding to a window multiple and window partitioning of (B, H, W, C) maps."""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def pad_to_multiple(x: torch.Tensor, multiple: Union[int, Tuple[int, int]],
                    value: float = 0.) -> torch.Tensor:
    """Pad a (B, H, W, C) map at the bottom/right so that H and W are multiples of ``multiple``."""
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % mh, -w % mw
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=value)
    return x


def window_partition(x: torch.Tensor, window: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, wh * ww, C); H, W must be multiples of the window."""
    wh, ww = (window, window) if isinstance(window, int) else window
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Union[int, Tuple[int, int]], h: int,
                   w: int) -> torch.Tensor:
    """(B * num_windows, wh * ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    wh, ww = (window, window) if isinstance(window, int) else window
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // wh) * (w // ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def window_padding_mask(hw: Tuple[int, int], window: Union[int, Tuple[int, int]],
                        device: torch.device) -> Optional[torch.Tensor]:
    """(num_windows, wh * ww) bool, True for the tokens that :func:`pad_to_multiple` adds to an
    (H, W) map, in :func:`window_partition` order; ``None`` when the map needs no padding."""
    mh, mw = (window, window) if isinstance(window, int) else window
    h, w = hw
    if h % mh == 0 and w % mw == 0:
        return None
    padding = torch.ones(1, h + -h % mh, w + -w % mw, 1, dtype=torch.bool, device=device)
    padding[:, :h, :w] = False
    return window_partition(padding, (mh, mw)).squeeze(-1)
