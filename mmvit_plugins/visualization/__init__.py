"""Pictures of what the backbones do: BOAT's feature-space groups, Refiner-ViT's maps before
and after the refiner, MAFormer's window and global tokens, and every pyramid level, painted
over the input image (``tools/analysis/visualize_attention.py``, docs/visualization.md)."""
import os.path as osp
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Union

import mmcv
import numpy as np
import torch
from torch import nn

from .pictures import (
    Point,
    check_point,
    cluster_picture,
    fsla_query_picture,
    pyramid_picture,
    refiner_picture,
    window_picture,
)
from .recorder import (
    BLOCK_KINDS,
    AttentionRecorder,
    attention_blocks,
    attention_weights,
    select_blocks,
)

# what ``draw_attention`` can draw: the block kinds of the recorder, and the pyramid
PICTURES = ('pyramid', *BLOCK_KINDS)


def _file_name(block: str, what: str) -> str:
    return f"{block.replace('.', '_')}_{what}.png"


@torch.no_grad()
def draw_attention(backbone: nn.Module, inputs: torch.Tensor, image: np.ndarray, out_dir: str,
                   pictures: Optional[Sequence[str]] = None,
                   blocks: Optional[Sequence[Union[int, str]]] = None,
                   query: Optional[Point] = None,
                   heads: Optional[Sequence[int]] = None) -> List[str]:
    """Run ``backbone`` once on ``inputs`` and write the pictures of its first image.

    Args:
        backbone: a module whose forward returns the pyramid maps (an mm backbone, a timm
            ``features_only`` model), in eval mode.
        inputs: (B, C, H, W) normalised images; ``image`` (H, W, 3) uint8 RGB, the first one
            as it is shown.
        pictures: of :data:`PICTURES`; default: the pyramid and every kind the backbone has.
        blocks: the attention blocks (names or indexes, see :func:`select_blocks`).
        query: (x, y) pixel of the query; default: the image centre.
        heads: the heads drawn (default: all).

    Returns:
        The written PNG paths: ``pyramid.png``, and per block ``<block>_clusters.png`` and
        ``<block>_query.png`` (FSLA), ``<block>_refiner.png``, ``<block>_window.png``.
    """
    kinds = sorted(set(attention_blocks(backbone).values()))
    if pictures is None:
        pictures = ['pyramid', *kinds]
    bad = [p for p in pictures if p not in PICTURES]
    if bad:
        raise ValueError(f'pictures {bad} are invalid; allowed values: {PICTURES}')
    if inputs.shape[-2:] != image.shape[:2]:
        raise ValueError(f'inputs of size {tuple(inputs.shape[-2:])} and an image of size '
                         f'{image.shape[:2]} must match')
    height, width = image.shape[:2]
    point = check_point(query if query is not None else (width // 2, height // 2),
                        (height, width))
    block_kinds = [p for p in pictures if p != 'pyramid']
    recorder = AttentionRecorder(backbone, blocks, block_kinds) if block_kinds else None
    with recorder or nullcontext():
        features = backbone(inputs)

    written: Dict[str, np.ndarray] = {}
    if 'pyramid' in pictures:
        written['pyramid.png'] = pyramid_picture(features, image)
    for name, record in (recorder.records if recorder else {}).items():
        kind = recorder.selected[name]
        if kind == 'clusters':
            written[_file_name(name, 'clusters')] = cluster_picture(record, image, heads)
            written[_file_name(name, 'query')] = fsla_query_picture(record, image, point, heads)
        elif kind == 'refiner':
            written[_file_name(name, 'refiner')] = refiner_picture(record, image, point, heads)
        else:
            written[_file_name(name, 'window')] = window_picture(record, image, point)
    paths = []
    for file_name, picture in written.items():
        path = osp.join(out_dir, file_name)
        mmcv.imwrite(mmcv.rgb2bgr(picture), path)
        paths.append(path)
    return paths


__all__ = ['PICTURES', 'AttentionRecorder', 'attention_blocks', 'attention_weights',
           'draw_attention', 'select_blocks']
