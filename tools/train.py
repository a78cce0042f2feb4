"""Train an mmdet or mmseg model whose config uses mmvit_plugins backbones.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
                          [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]

--auto-scale-lr scales the optimizer's learning rate(s) by (processes x batch_size) /
``auto_scale_lr.base_batch_size``, as mmdet's tools/train.py does (mmengine's Runner scales).
"""
import argparse
import os

from mmvit_plugins.utils.checkpoint import allow_full_checkpoint_loading

allow_full_checkpoint_loading()  # before anything may call torch.load

from mmengine.config import Config  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmvit_plugins.utils.runtime import (  # noqa: E402
    DictAction,
    prepare_config,
    shut_down_distributed,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector or segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or from the latest one in the work dir if no '
        'path is given')
    parser.add_argument('--amp', action='store_true', help='mixed-precision training')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='scale the lr by the actual total batch size over the config\'s '
        'auto_scale_lr.base_batch_size')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def enable_auto_scale_lr(cfg: Config) -> None:
    """Switch on mmengine's lr scaling; the config must name its ``base_batch_size``."""
    base = (cfg.get('auto_scale_lr') or {}).get('base_batch_size')
    if not isinstance(base, int) or isinstance(base, bool) or base <= 0:
        raise ValueError(f'--auto-scale-lr needs auto_scale_lr.base_batch_size in the config (a '
                         f'positive int, the total batch the lr is set for), got {base!r}; e.g. '
                         'auto_scale_lr = dict(enable=False, base_batch_size=16)')
    cfg.auto_scale_lr.enable = True


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = prepare_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP training is already enabled in the config.')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    shut_down_distributed()


if __name__ == '__main__':
    main()
