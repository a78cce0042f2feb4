"""Run a trained mmdet or mmseg model of a config on one image and write the painted result.

    python tools/misc/image_demo.py IMG CONFIG CHECKPOINT [--out-file F] [--device cpu|cuda[:N]]
                                    [--score-thr 0.3] [--opacity 0.5] [--trust-checkpoint]

The task follows from the config's ``default_scope``: mmdet (boxes, masks and class names of the
predictions scoring at least ``--score-thr``) or mmseg (the predicted class map blended over the
image with ``--opacity``). Loading the config imports what its ``custom_imports`` names (this
plugin); the model is built by mmdet's ``init_detector`` / mmseg's ``init_model``, the image goes
through the config's test pipeline (``test_dataloader.dataset.pipeline`` without annotation
loading) and the config's visualizer paints the result, at the image's size. CHECKPOINT is read
with the safe loader of mmvit_plugins.checkpoint; --trust-checkpoint unpickles it fully.
"""
import argparse
import os.path as osp
import sys
from typing import Any, List, Optional, Sequence, Tuple

import mmcv
import torch
from mmengine.config import Config
from mmengine.registry import VISUALIZERS

from mmvit_plugins.checkpoint import safe_mmengine_loading
from mmvit_plugins.utils.runtime import config_scope, register_scope, replace_sync_bn


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument('checkpoint', help='checkpoint of a model trained with the config')
    parser.add_argument('--out-file', help='painted result (default: '
                        'work_dirs/image_demo/<image name>.png)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='mmdet: lowest score of a drawn prediction, in [0, 1]')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='mmseg: opacity of the painted class map, in (0, 1]')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='read CHECKPOINT with full unpickling, which runs any code it names: only for a '
        'file you trust (by default tensors and plain containers load)')
    args = parser.parse_args(argv)
    for name in ('img', 'config', 'checkpoint'):
        if not osp.isfile(getattr(args, name)):
            parser.error(f'{name.upper()} {getattr(args, name)!r} is not a file')
    if not (args.device == 'cpu' or args.device == 'cuda' or args.device.startswith('cuda:')):
        parser.error(f"--device={args.device!r}; allowed values: 'cpu', 'cuda', 'cuda:N'")
    if args.device != 'cpu' and not torch.cuda.is_available():
        parser.error(f'--device={args.device!r}: CUDA is not available; use --device cpu')
    if not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr={args.score_thr}; allowed values: [0, 1]')
    if not 0 < args.opacity <= 1:
        parser.error(f'--opacity={args.opacity}; allowed values: (0, 1]')
    if args.out_file is None:
        name = osp.splitext(osp.basename(args.img))[0]
        args.out_file = osp.join('work_dirs', 'image_demo', f'{name}.png')
    return args


def inference_pipeline(cfg: Config) -> List[dict]:
    """The config's test pipeline without annotation loading (a single image has none)."""
    return [t for t in cfg.test_dataloader.dataset.pipeline if t['type'] != 'LoadAnnotations']


def predict(cfg: Config, scope: str, args: argparse.Namespace) -> Tuple[Any, Any, dict]:
    """(model, prediction of ``args.img``, the visualizer's task options)."""
    if scope == 'mmdet':
        from mmcv.transforms import Compose
        from mmdet.apis import inference_detector, init_detector
        model = init_detector(cfg, args.checkpoint, device=args.device)
        result = inference_detector(model, args.img,
                                    test_pipeline=Compose(inference_pipeline(model.cfg)))
        return model, result, dict(pred_score_thr=args.score_thr)
    from mmseg.apis import inference_model, init_model
    model = init_model(cfg, args.checkpoint, device=args.device)
    model.cfg.test_pipeline = inference_pipeline(model.cfg)
    return model, inference_model(model, args.img), dict(with_labels=False)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Paint the prediction for one image; print and return the output path."""
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    scope = config_scope(cfg)
    register_scope(scope)
    if args.device == 'cpu':
        replace_sync_bn(cfg.model)  # SyncBN needs CUDA, as tools/train.py and tools/test.py do
    image = mmcv.imread(args.img, channel_order='rgb')
    with safe_mmengine_loading([args.checkpoint] if args.trust_checkpoint else []):
        model, result, extra = predict(cfg, scope, args)
    # Its own instance: a runner in the same process may have built one named 'visualizer'.
    visualizer = VISUALIZERS.build(dict(cfg.visualizer, name=f'image_demo:{args.out_file}'))
    visualizer.dataset_meta = model.dataset_meta
    if scope == 'mmseg':
        visualizer.alpha = args.opacity
    visualizer.add_datasample(osp.basename(args.img), image, result, draw_gt=False,
                              draw_pred=True, show=False, out_file=args.out_file, **extra)
    print(f'painted {scope} prediction of {args.img} written to {args.out_file}')
    return args.out_file


if __name__ == '__main__':
    main(sys.argv[1:])
