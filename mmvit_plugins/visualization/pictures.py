"""Pictures of the records of :mod:`.recorder`, painted over the input image.

Every picture is a grid of panels of the input's size (H, W), so a picture of ``r`` rows and
``c`` columns is ``(r * H, c * W)`` pixels; each function states its rows and columns. A token
of a stride-s map covers the s x s pixels from its corner (the stems pad at the bottom and
right, so the last row and column of tokens may cover fewer). Heat maps are mmengine's overlay
(``convert_overlay_heatmap``: min-max scaled, JET colours); pixels outside the keys a query
sees are darkened. Images are RGB ``uint8`` arrays.
"""
import colorsys
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from mmengine.visualization import Visualizer
from mmengine.visualization.utils import convert_overlay_heatmap

from .recorder import ClusterRecord, RefinerRecord, WindowRecord

Point = Tuple[int, int]  # (x, y) pixels
_OUTSIDE = 0.3  # brightness of pixels outside what a query attends to
_GOLDEN = 0.618033988749895


def token_stride(image_hw: Tuple[int, int], grid_hw: Tuple[int, int]) -> int:
    """The power-of-two stride s of a (h, w) token grid of an (H, W) image: h = ceil(H / s),
    w = ceil(W / s); the largest where several fit (an image smaller than the stride)."""
    fits = [1 << i for i in range(12)
            if all(-(-size // (1 << i)) == n for size, n in zip(image_hw, grid_hw))]
    if not fits:
        raise ValueError(f'a {grid_hw[0]}x{grid_hw[1]} token grid is no power-of-two stride of '
                         f'a {image_hw[0]}x{image_hw[1]} image')
    return fits[-1]


def check_point(point: Point, image_hw: Tuple[int, int]) -> Point:
    x, y = point
    if not (0 <= x < image_hw[1] and 0 <= y < image_hw[0]):
        raise ValueError(f'--query {x} {y} is outside the image; allowed values: X in '
                         f'[0, {image_hw[1] - 1}], Y in [0, {image_hw[0] - 1}]')
    return point


def token_at(point: Point, image_hw: Tuple[int, int], grid_hw: Tuple[int, int]) -> int:
    """The row-major index of the token of a grid that covers pixel ``point``."""
    x, y = check_point(point, image_hw)
    stride = token_stride(image_hw, grid_hw)
    return (y // stride) * grid_hw[1] + x // stride


def to_pixels(values: torch.Tensor, image_hw: Tuple[int, int]) -> np.ndarray:
    """(..., h, w) token values -> (..., H, W) numpy: each token's value on its pixels."""
    stride = token_stride(image_hw, values.shape[-2:])
    pixels = values.repeat_interleave(stride, -2).repeat_interleave(stride, -1)
    return pixels[..., :image_hw[0], :image_hw[1]].cpu().numpy()


def group_colours(count: int) -> np.ndarray:
    """(count, 3) uint8 RGB colours of well-separated hues."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * _GOLDEN) % 1, .85, .95)]
                     for i in range(count)], dtype=np.uint8)


def paint_groups(image: np.ndarray, groups: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Every pixel in the colour of its group (``groups`` (H, W) ints), blended over the image,
    with the borders between groups drawn dark."""
    colours = group_colours(int(groups.max()) + 1)[groups]
    out = cv2.addWeighted(image, 1 - alpha, colours, alpha, 0)
    border = np.zeros(groups.shape, dtype=bool)
    border[1:] |= groups[1:] != groups[:-1]
    border[:, 1:] |= groups[:, 1:] != groups[:, :-1]
    out[border] //= 3
    return out


def paint_heat(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``values`` (H, W) as mmengine's heat overlay; NaN pixels (not attended to) darkened."""
    outside = np.isnan(values)
    filled = np.where(outside, np.nanmin(values), values).astype(np.float32)
    out = convert_overlay_heatmap(filled, image, alpha)
    out[outside] = (out[outside] * _OUTSIDE).astype(np.uint8)
    return out


def mark(panel: np.ndarray, point: Point) -> np.ndarray:
    """A cross at ``point``, white on black so it shows over any colour."""
    size = max(5, min(panel.shape[:2]) // 16)
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.drawMarker(panel, tuple(point), colour, cv2.MARKER_CROSS, size, thickness)
    return panel


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a black box in the top-left corner."""
    scale = max(0.35, panel.shape[1] / 640)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(panel, (0, 0), (width + 3, height + baseline + 3), (0, 0, 0), cv2.FILLED)
    cv2.putText(panel, text, (2, height + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                1, cv2.LINE_AA)
    return panel


def tile(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Panels of one size in rows and columns -> one image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


def _heads(chosen: Optional[Sequence[int]], num_heads: int) -> List[int]:
    if chosen is None:
        return list(range(num_heads))
    bad = [h for h in chosen if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f'--heads {bad} is invalid for a block of {num_heads} heads; allowed '
                         f'values: 0..{num_heads - 1}')
    return list(chosen)


def cluster_picture(record: ClusterRecord, image: np.ndarray,
                    heads: Optional[Sequence[int]] = None) -> np.ndarray:
    """Rows: the heads; columns: levels 1..k of the balanced splits, the last one the final
    groups the attention ran in (a map of at most m tokens: one column, one group)."""
    groups = record.groups()
    if not len(groups):
        groups = groups.new_zeros(1, *groups.shape[1:])
    pixels = to_pixels(groups, image.shape[:2])
    k = record.num_levels
    return tile([[caption(paint_groups(image, pixels[level, head]),
                          f'head {head} level {level + 1}/{k}' if k else f'head {head}: one group')
                  for level in range(len(pixels))]
                 for head in _heads(heads, record.num_heads)])


def fsla_query_picture(record: ClusterRecord, image: np.ndarray, point: Point,
                       heads: Optional[Sequence[int]] = None) -> np.ndarray:
    """One row; columns: the heads. The weights of the query at ``point`` over the tokens of
    its group and the overlap keys it borrows; the other tokens darkened."""
    weights = record.query_weights(token_at(point, image.shape[:2], record.grid))
    weights = weights.masked_fill(weights == 0, float('nan'))
    pixels = to_pixels(weights, image.shape[:2])
    return tile([[caption(mark(paint_heat(image, pixels[head]), point), f'head {head}')
                  for head in _heads(heads, record.num_heads)]])


def refiner_picture(record: RefinerRecord, image: np.ndarray, point: Point,
                    heads: Optional[Sequence[int]] = None) -> np.ndarray:
    """Rows: the heads, then their mean; columns: the query's map entering the refiner and the
    map leaving it (applied to the values). Windowed blocks: the query's window only."""
    before, after = record.query_maps(token_at(point, image.shape[:2], record.grid))
    chosen = _heads(heads, before.shape[0])
    rows = [(f'head {h}', before[h], after[h]) for h in chosen]
    rows.append(('mean', before.mean(0), after.mean(0)))
    return tile([[caption(mark(paint_heat(image, to_pixels(m, image.shape[:2])), point),
                          f'{name} {when}') for m, when in ((b, 'before'), (a, 'after'))]
                 for name, b, a in rows])


def window_picture(record: WindowRecord, image: np.ndarray, point: Point,
                   top: int = 3) -> np.ndarray:
    """One row, head means: the query's window attention (its window), what the global tokens
    it attends to read of the map (their footprints weighted by its fusion attention), and the
    footprints (magnitude) of the ``top`` global tokens it attends to most."""
    token = token_at(point, image.shape[:2], record.grid)
    local = to_pixels(record.local_weights(token).mean(0), image.shape[:2])
    weights = record.global_weights(token).mean(0)
    footprints = record.footprints().to(weights.device)
    combined = to_pixels(torch.einsum('m,mhw->hw', weights, footprints), image.shape[:2])
    panels = [caption(mark(paint_heat(image, local), point), 'window'),
              caption(mark(paint_heat(image, combined), point), 'global tokens')]
    best = weights.topk(min(top, len(weights)))
    for weight, index in zip(best.values.tolist(), best.indices.tolist()):
        footprint = to_pixels(footprints[index].abs(), image.shape[:2])
        panels.append(caption(mark(paint_heat(image, footprint), point),
                              f'token {index}: {weight:.2g}'))
    return tile([panels])


def pyramid_picture(features: Sequence[torch.Tensor], image: np.ndarray) -> np.ndarray:
    """One row; columns: the pyramid levels (first image), channels reduced and overlaid by
    mmengine's ``Visualizer.draw_featmap`` (``squeeze_mean``). Each map is first upsampled by
    its stride (bilinear) and cropped to the image, so that every token lies over its pixels."""
    panels = []
    for i, feat in enumerate(features):
        stride = token_stride(image.shape[:2], feat.shape[-2:])
        feat = F.interpolate(feat[:1].float(), scale_factor=stride, mode='bilinear')
        feat = feat[0, :, :image.shape[0], :image.shape[1]].cpu()
        panel = Visualizer.draw_featmap(feat, image, channel_reduction='squeeze_mean')
        panels.append(caption(panel, f'level {i}: stride {stride}'))
    return tile([panels])
