"""The main job on a machine without data: make a toy dataset, evaluate the untrained model,
train on CPU, evaluate again, print both scores, write prediction overlays as PNG files, paint
one validation image with tools/misc/image_demo.py and the trained checkpoint, draw what its
attention does on that image with tools/analysis/visualize_attention.py, and deploy it:
export to ONNX with tools/deployment/deploy.py (mmdeploy, dynamic shapes) and evaluate
``end2end.onnx`` with onnxruntime on the validation set with tools/deployment/test.py.

    python tools/misc/demo.py --task seg   # UperNet + BOAT-CSWin-T, ADE20K layout, mIoU
    python tools/misc/demo.py --task det   # Mask R-CNN + BOAT-Swin-T, COCO layout, bbox/segm mAP

The full-size config is loaded unchanged and then overridden for the toy data and a few
minutes of CPU time; every override is printed, and the final config is written to the work
dir (``python tools/train.py <work-dir>/toy_config.py`` repeats the training). The backbone is
trained from scratch (no checkpoint is downloaded). Exits with status 1 when the trained model
does not beat the untrained one by ``--min-gain``, or when onnxruntime's metric differs from
PyTorch's by more than 0.5 mIoU points (seg) or 0.01 bbox mAP (det).
"""
import argparse
import importlib.util
import os.path as osp
import sys
import time
from types import ModuleType
from typing import List, Tuple

import mmcv
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner import Runner, find_latest_checkpoint
from mmengine.utils import mkdir_or_exist

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from image_demo import main as image_demo  # noqa: E402
from make_toy_dataset import make_det_toy, make_seg_toy, toy_overrides  # noqa: E402

from mmvit_plugins.utils.runtime import prepare_config  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TASKS = {
    'seg': dict(config='configs/upernet_boat_cswin_t_ade20k.py', data_root='data/toy_ade',
                size=128, crop=96, num_train=48, iters=120, lr=1e-3, batch_size=4, min_gain=10.0,
                metrics=('mIoU', ), max_deploy_diff=0.5,
                deploy_cfg='configs/deploy/mmseg/segmentation_onnxruntime_dynamic.py'),
    'det': dict(config='configs/mask_rcnn_boat_swin_t_fpn_1x_coco.py', data_root='data/toy_coco',
                size=128, crop=0, num_train=48, iters=144, lr=2e-4, batch_size=2, min_gain=0.05,
                metrics=('coco/bbox_mAP', 'coco/segm_mAP'), max_deploy_diff=0.01,
                deploy_cfg='configs/deploy/mmdet/instance-seg/instance-seg_onnxruntime_dynamic.py'),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', choices=sorted(TASKS), default='seg')
    parser.add_argument('--config', help='full-size config (default: per task)')
    parser.add_argument('--data-root', help='toy dataset folder (default: data/toy_ade|coco)')
    parser.add_argument('--work-dir', help='default: work_dirs/demo_<task>')
    parser.add_argument('--iters', type=int, help='training iterations (default: per task)')
    parser.add_argument('--lr', type=float, help='peak AdamW learning rate (default: per task)')
    parser.add_argument('--min-gain', type=float,
                        help='required gain of the first metric (seg: mIoU points, det: bbox mAP)')
    parser.add_argument('--full-model', action='store_true',
                        help='train the config\'s model unchanged (default: at most 2 blocks per '
                        'stage and narrower heads, for a few minutes of CPU)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    if args.iters is not None and args.iters < 1:
        parser.error(f'--iters={args.iters} must be >= 1')
    return args


def shrink_model(cfg: Config) -> List[str]:
    """Keep the backbone's widths, heads and block types but at most 2 blocks per stage (a
    plain ViT: 4 blocks), and make the heads 4x narrower: the same code paths at a fraction of
    the CPU time."""
    backbone = cfg.model.backbone
    name = backbone.arch
    preset = dict(MODELS.get(backbone.type).arch_zoo[name])
    if 'depths' in preset:
        preset['depths'] = [min(depth, 2) for depth in preset['depths']]
        depth = f"depths {preset['depths']}"
    else:
        preset['num_layers'] = min(preset['num_layers'], 4)
        depth = f"{preset['num_layers']} blocks"
    backbone.arch = preset
    changes = [f'backbone {backbone.type}: the {name!r} preset with {depth} '
               '(widths, heads and block types unchanged; --full-model keeps every block)']
    model = cfg.model
    if 'decode_head' in model:
        model.decode_head.channels //= 4
        model.auxiliary_head.channels //= 4
        changes.append(f'decode head channels {model.decode_head.channels}, auxiliary head '
                       f'{model.auxiliary_head.channels} (4x narrower)')
        return changes
    width = model.neck.out_channels // 4
    model.neck.out_channels = width
    model.rpn_head.update(in_channels=width, feat_channels=width)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = width
    roi.bbox_head.update(in_channels=width, fc_out_channels=roi.bbox_head.fc_out_channels // 4)
    roi.mask_head.update(in_channels=width, conv_out_channels=width)
    model.train_cfg.rpn_proposal.update(nms_pre=600, max_per_img=300)
    model.train_cfg.rcnn.sampler.num = 128
    model.test_cfg.rpn.update(nms_pre=300, max_per_img=100)
    changes.append(f'FPN/RPN/RoI head channels {width}, box head fc '
                   f'{roi.bbox_head.fc_out_channels} (4x narrower); 300 proposals and 128 '
                   'sampled RoIs per image in training, 100 proposals in testing')
    return changes


def demo_overrides(cfg: Config, task: str, iters: int, lr: float, batch_size: int,
                   num_train: int, seed: int) -> List[str]:
    """Schedule, optimizer and runtime overrides for a few minutes of CPU training."""
    cfg.model.backbone.init_cfg = None
    warmup = max(10, iters // 10)
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.optim_wrapper.clip_grad = dict(max_norm=1.0, norm_type=2)
    cfg.train_dataloader.batch_size = batch_size
    if task == 'seg':
        warmup = min(warmup, iters)
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
        cfg.param_scheduler = [
            dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=warmup),
        ]
        if warmup < iters:
            cfg.param_scheduler.append(dict(type='PolyLR', eta_min=0.0, power=1.0,
                                            by_epoch=False, begin=warmup, end=iters))
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                            interval=iters)
        schedule = f'{iters} iterations'
    else:
        per_epoch = -(-num_train // batch_size)
        epochs = max(1, round(iters / per_epoch))
        iters = epochs * per_epoch
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=epochs, val_interval=epochs)
        cfg.param_scheduler = [
            dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=warmup),
            dict(type='MultiStepLR', by_epoch=True, begin=0, end=epochs,
                 milestones=[round(epochs * 0.75)], gamma=0.1),
        ]
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=epochs)
        schedule = f'{epochs} epochs = {iters} iterations'
    # Evaluation happens outside the training loop (before and after it).
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.logger.interval = 10
    cfg.randomness = dict(seed=seed)
    return [
        'backbone init_cfg=None (trained from scratch: no checkpoint is downloaded)',
        f'schedule: {schedule}, batch {batch_size}, warm-up {warmup} iterations, '
        f'AdamW lr={lr:g} (the full config: 6e-5/1e-4 for pretrained backbones), '
        'grad clip 1.0',
        f'seed={seed}',
    ]


def write_overlays(runner: Runner, task: str, out_dir: str) -> List[str]:
    """Ground truth | prediction overlays of every test image, as PNG files."""
    runner.model.eval()
    paths = []
    with torch.no_grad():
        for batch in runner.test_dataloader:
            for sample in runner.model.test_step(batch):
                name = osp.splitext(osp.basename(sample.img_path))[0]
                path = osp.join(out_dir, f'{name}.png')
                image = mmcv.imread(sample.img_path, channel_order='rgb')
                extra = dict(with_labels=False) if task == 'seg' else dict(pred_score_thr=0.5)
                runner.visualizer.add_datasample(name, image, sample, draw_gt=True,
                                                 draw_pred=True, show=False, out_file=path,
                                                 **extra)
                paths.append(path)
    return paths


def paint_one_image(runner: Runner, work_dir: str) -> str:
    """tools/misc/image_demo.py with the trained checkpoint on the first validation image."""
    image = runner.test_dataloader.dataset.get_data_info(0)['img_path']
    name = osp.splitext(osp.basename(image))[0]
    argv = [image, osp.join(work_dir, 'toy_config.py'), find_latest_checkpoint(work_dir),
            '--out-file', osp.join(work_dir, 'image_demo', f'{name}.png')]
    print(f'[demo] python tools/misc/image_demo.py {" ".join(argv)}')
    out_file = image_demo(argv)
    print(f'[demo] the trained model on one validation image: {out_file}')
    return out_file


def draw_attention(runner: Runner, work_dir: str) -> List[str]:
    """tools/analysis/visualize_attention.py with the trained checkpoint on the first
    validation image: the pyramid maps and the pictures of the first attention block (BOAT:
    its groups and the attention of the image centre in its group)."""
    image = runner.test_dataloader.dataset.get_data_info(0)['img_path']
    argv = [osp.join(work_dir, 'toy_config.py'), find_latest_checkpoint(work_dir), image,
            '--out-dir', osp.join(work_dir, 'attention'), '--blocks', '0']
    print(f'[demo] python tools/analysis/visualize_attention.py {" ".join(argv)}')
    paths = _load_tool('analysis', 'visualize_attention').main(argv)
    print(f'[demo] {len(paths)} attention PNGs of that image (docs/visualization.md): '
          f'{osp.dirname(paths[0])}')
    return paths


def _load_tool(folder: str, name: str) -> ModuleType:
    path = osp.join(REPO, 'tools', folder, f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'{folder}_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_and_evaluate(runner: Runner, task: str, work_dir: str) -> Tuple[dict, str]:
    """tools/deployment/deploy.py on the trained checkpoint, then tools/deployment/test.py on
    the exported model; returns test.py's metrics and the ONNX file."""
    spec = TASKS[task]
    deploy_cfg = osp.join(REPO, spec['deploy_cfg'])
    config = osp.join(work_dir, 'toy_config.py')
    image = runner.test_dataloader.dataset.get_data_info(0)['img_path']
    onnx_dir = osp.join(work_dir, 'deploy')
    argv = [deploy_cfg, config, find_latest_checkpoint(work_dir), image, '--work-dir', onnx_dir,
            '--log-level', 'WARNING']
    print(f'[demo] python tools/deployment/deploy.py {" ".join(argv)}')
    onnx_file = _load_tool('deployment', 'deploy').main(argv)['onnx']
    argv = [deploy_cfg, config, '--model', onnx_file, '--work-dir', onnx_dir]
    print(f'[demo] python tools/deployment/test.py {" ".join(argv)}')
    return _load_tool('deployment', 'test').main(argv), onnx_file


def main() -> int:
    args = parse_args()
    spec = TASKS[args.task]
    config = args.config or osp.join(REPO, spec['config'])
    data_root = args.data_root or osp.join(REPO, spec['data_root'])
    work_dir = args.work_dir or osp.join(REPO, 'work_dirs', f'demo_{args.task}')
    iters = args.iters or spec['iters']
    lr = args.lr or spec['lr']
    min_gain = spec['min_gain'] if args.min_gain is None else args.min_gain
    start = time.time()

    make = make_seg_toy if args.task == 'seg' else make_det_toy
    num_train = spec['num_train']
    make(data_root, num_train=num_train, num_val=12, size=spec['size'], seed=args.seed)
    print(f'[demo] toy dataset: {data_root}')

    cfg = prepare_config(config, work_dir=work_dir)
    changes = toy_overrides(cfg, args.task, data_root, spec['size'], spec['crop'])
    if not args.full_model:
        changes += shrink_model(cfg)
    changes += demo_overrides(cfg, args.task, iters, lr, spec['batch_size'], num_train,
                              args.seed)
    print(f'[demo] config: {osp.relpath(config, REPO)}, overridden for a CPU run:')
    for change in changes:
        print(f'[demo]   - {change}')
    mkdir_or_exist(work_dir)
    cfg.dump(osp.join(work_dir, 'toy_config.py'))

    runner = Runner.from_cfg(cfg)
    runner.model.init_weights()
    untrained = dict(runner.test())
    runner.train()
    trained = dict(runner.test())
    overlays = write_overlays(runner, args.task, osp.join(work_dir, 'overlays'))

    print(f'[demo] {args.task}: {osp.basename(config)} on {data_root} '
          f'({time.time() - start:.0f} s)')
    for key in spec['metrics']:
        print(f'[demo]   {key:<14} untrained {untrained[key]:7.3f}   trained {trained[key]:7.3f}')
    print(f'[demo] {len(overlays)} overlay PNGs (ground truth | prediction): '
          f'{osp.dirname(overlays[0])}')
    paint_one_image(runner, work_dir)
    draw_attention(runner, work_dir)
    key = spec['metrics'][0]
    gain = trained[key] - untrained[key]
    if gain < min_gain:
        print(f'[demo] FAILED: {key} gained {gain:.3f}, less than --min-gain={min_gain}')
        return 1

    deploy_start = time.time()
    deployed, onnx_file = deploy_and_evaluate(runner, args.task, work_dir)
    name = 'mIoU' if args.task == 'seg' else 'bbox mAP'
    print(f'[demo] onnxruntime {name} {deployed[key]:.3f} (PyTorch {trained[key]:.3f}): '
          f'{onnx_file}, exported and evaluated in {time.time() - deploy_start:.0f} s')
    diff = abs(deployed[key] - trained[key])
    if diff > spec['max_deploy_diff']:
        print(f'[demo] FAILED: onnxruntime and PyTorch {name} differ by {diff:.3f}, more than '
              f"{spec['max_deploy_diff']}")
        return 1
    print(f'[demo] OK: {key} gained {gain:.3f} (>= {min_gain})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
