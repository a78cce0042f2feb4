"""Paint what a backbone's attention does on one image: BOAT's feature-space groups, Refiner-ViT's
maps before and after the refiner, MAFormer's window and global tokens, and every pyramid level.

    python tools/analysis/visualize_attention.py CONFIG CHECKPOINT IMAGE --out-dir DIR
        [--pictures pyramid clusters refiner window] [--blocks B [B ...]] [--query X Y]
        [--heads H [H ...]] [--device cpu|cuda[:N]] [--trust-checkpoint]

CONFIG is an mmdet or mmseg config (built as tools/misc/image_demo.py builds it) or the name of
a timm model of this package (``boat_cswin_tiny``...; built with ``features_only=True``).
CHECKPOINT is a checkpoint file of that model (mm: as tools/test.py reads it; timm: any layout
its checkpoint filter takes), or ``none`` for the initial weights (the mechanics only). The
image is normalised as the config's data preprocessor (timm: the model's pretrained config)
does it and fed at its own size, unresized; resize it beforehand to see the model at its test
scale. The pictures, written to DIR and printed, are those of the first image only, at the
image's size or a grid of panels of that size (docs/visualization.md):

- ``pyramid.png``: every pyramid level (1 row, a column per level);
- ``<block>_clusters.png`` (BOAT FSLA blocks): each token coloured by its group at levels
  1..k of the balanced splits (a row per head, a column per level; the last: the final groups);
- ``<block>_query.png`` (BOAT): the weights of the query over the keys of its group (a column
  per head);
- ``<block>_refiner.png`` (Refiner-ViT sharing blocks): the query's map entering and leaving the
  refiner (a row per head and one for their mean; 2 columns);
- ``<block>_window.png`` (MAFormer MAF blocks): the query's window attention, what its global
  tokens read of the map weighted by its attention to them, and the 3 global tokens it attends
  to most (1 row, 5 columns).

``--blocks`` takes block names or indexes (an invalid one lists the valid choices); the query
(default: the image centre) is a pixel ``X Y``.
"""
import argparse
import os.path as osp
import sys
from typing import Optional, Sequence, Tuple, Union

import mmcv
import numpy as np
import torch
from mmengine.config import Config
from torch import nn

from mmvit_plugins.checkpoint import safe_mmengine_loading
from mmvit_plugins.utils.runtime import config_scope, register_scope, replace_sync_bn
from mmvit_plugins.visualization import PICTURES, draw_attention


def _block(text: str) -> Union[int, str]:
    return int(text) if text.lstrip('-').isdigit() else text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmdet/mmseg config file, or a timm model name')
    parser.add_argument('checkpoint', help="checkpoint file, or 'none' for the initial weights")
    parser.add_argument('image', help='image file')
    parser.add_argument('--out-dir', help='default: work_dirs/attention/<image name>')
    parser.add_argument('--pictures', nargs='+', choices=PICTURES,
                        help='default: the pyramid and every kind the backbone has')
    parser.add_argument('--blocks', nargs='+', type=_block,
                        help='attention blocks, by name or index (default: all)')
    parser.add_argument('--query', nargs=2, type=int, metavar=('X', 'Y'),
                        help='query pixel (default: the image centre)')
    parser.add_argument('--heads', nargs='+', type=int, help='heads drawn (default: all)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='read CHECKPOINT with full unpickling, which runs any code it names: only for a '
        'file you trust (by default tensors and plain containers load)')
    args = parser.parse_args(argv)
    if not osp.isfile(args.image):
        parser.error(f'IMAGE {args.image!r} is not a file')
    if args.checkpoint != 'none' and not osp.isfile(args.checkpoint):
        parser.error(f"CHECKPOINT {args.checkpoint!r} is not a file; allowed values: a "
                     "checkpoint file or 'none'")
    if not (args.device == 'cpu' or args.device == 'cuda' or args.device.startswith('cuda:')):
        parser.error(f"--device={args.device!r}; allowed values: 'cpu', 'cuda', 'cuda:N'")
    if args.device != 'cpu' and not torch.cuda.is_available():
        parser.error(f'--device={args.device!r}: CUDA is not available; use --device cpu')
    if args.out_dir is None:
        name = osp.splitext(osp.basename(args.image))[0]
        args.out_dir = osp.join('work_dirs', 'attention', name)
    return args


def _normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
               device: str) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float ``(image - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std)[None].to(device)


def mm_backbone(args: argparse.Namespace) -> Tuple[nn.Module, torch.Tensor, np.ndarray]:
    """(backbone, input, RGB image) of an mmdet/mmseg config: the model as image_demo.py
    builds it, the image as the config's data preprocessor normalises it (BGR file order, as
    ``LoadImageFromFile`` reads it, swapped where it says ``bgr_to_rgb``)."""
    cfg = Config.fromfile(args.config)
    scope = config_scope(cfg)
    register_scope(scope)
    if args.device == 'cpu':
        replace_sync_bn(cfg.model)
    checkpoint = None if args.checkpoint == 'none' else args.checkpoint
    with safe_mmengine_loading([checkpoint] if args.trust_checkpoint and checkpoint else []):
        if scope == 'mmdet':
            from mmdet.apis import init_detector
            model = init_detector(cfg, checkpoint, device=args.device)
        else:
            from mmseg.apis import init_model
            model = init_model(cfg, checkpoint, device=args.device)
    preprocessor = cfg.model.get('data_preprocessor') or {}
    image = mmcv.imread(args.image)  # BGR
    fed = image[..., ::-1] if preprocessor.get('bgr_to_rgb') else image
    inputs = _normalise(fed, preprocessor.get('mean', (0., ) * 3),
                        preprocessor.get('std', (1., ) * 3), args.device)
    return model.backbone, inputs, mmcv.bgr2rgb(image)


def timm_backbone(args: argparse.Namespace) -> Tuple[nn.Module, torch.Tensor, np.ndarray]:
    """(features_only model, input, RGB image) of a timm model name, the image normalised as
    its pretrained config says (RGB in [0, 1])."""
    import timm
    from timm.data import resolve_data_config
    if args.config not in timm.list_models('*'):
        names = ', '.join(n for n in timm.list_models(('boat*', 'maformer*', 'refiner_vit*')))
        raise SystemExit(f'CONFIG {args.config!r} is neither a config file nor a timm model '
                         f'name; names of this package: {names}')
    kwargs = {}
    if args.checkpoint != 'none':
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    model = timm.create_model(args.config, features_only=True, **kwargs).to(args.device)
    data = resolve_data_config({}, model=model)
    image = mmcv.imread(args.image, channel_order='rgb')
    inputs = _normalise(image / 255., data['mean'], data['std'], args.device)
    return model, inputs, image


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Write the pictures; print and return their paths."""
    args = parse_args(argv)
    build = mm_backbone if osp.isfile(args.config) else timm_backbone
    backbone, inputs, image = build(args)
    try:
        paths = draw_attention(backbone.eval(), inputs, image, args.out_dir, args.pictures,
                               args.blocks, args.query and tuple(args.query), args.heads)
    except ValueError as error:
        raise SystemExit(f'error: {error}') from None
    for path in paths:
        print(path)
    return paths


if __name__ == '__main__':
    main(sys.argv[1:])
