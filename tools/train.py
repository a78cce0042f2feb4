"""Train an mmdet or mmseg model whose config uses mmvit_plugins backbones.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--trust-checkpoint] [--amp]
                          [--auto-scale-lr] [--cfg-options key=value ...]
                          [--launcher none|pytorch|slurm|mpi]

Checkpoints (--resume, load_from, Pretrained init) are read with the safe loader of
mmvit_plugins.checkpoint: tensors, plain containers and mmengine's training state.
--trust-checkpoint reads the --resume / load_from checkpoint with full unpickling instead.
--auto-scale-lr scales the optimizer's learning rate(s) by (processes x batch_size) /
``auto_scale_lr.base_batch_size``, as mmdet's tools/train.py does (mmengine's Runner scales).
Before the Runner is built, the dataset folders, the pretrained weights and the checkpoint to
load are checked; missing ones are named in one message, with what prepares them.
"""
import argparse
import os
import sys
from typing import List

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint

from mmvit_plugins.checkpoint import safe_mmengine_loading
from mmvit_plugins.utils.preflight import MissingPathsError, check_paths
from mmvit_plugins.utils.runtime import (
    DictAction,
    configure_amp,
    configure_compile,
    prepare_config,
    seed_from_checkpoint,
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
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='read the --resume / load_from checkpoint with full unpickling, which runs any '
        'code it names: only for a file you trust (by default tensors, plain containers and '
        "mmengine's training state load)")
    parser.add_argument(
        '--amp', action='store_true',
        help='mixed-precision training: fp16 autocast with dynamic loss scale on CUDA, bf16 '
        'autocast on CPU')
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
    configure_amp(cfg, args.amp)
    configure_compile(cfg)
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    check_paths(cfg, 'tools/train.py', ('train', 'val'), pretrained=True,
                checkpoints=[('load_from', cfg.get('load_from'))])
    checkpoint = resumed_or_loaded(cfg)
    seed_from_checkpoint(cfg, checkpoint[0] if checkpoint else None, args.trust_checkpoint)
    with safe_mmengine_loading(checkpoint if args.trust_checkpoint else []):
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.train()
    shut_down_distributed()


def resumed_or_loaded(cfg: Config) -> List[str]:
    """The checkpoint the Runner will resume from or load: ``load_from``, or with
    ``resume=True`` and none, the latest in the work dir (as ``Runner.load_or_resume`` finds)."""
    if cfg.get('load_from'):
        return [cfg.load_from]
    latest = find_latest_checkpoint(cfg.work_dir) if cfg.get('resume') else None
    return [latest] if latest else []


if __name__ == '__main__':
    try:
        main()
    except MissingPathsError as error:
        sys.exit(str(error))
