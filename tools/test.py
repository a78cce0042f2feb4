"""Evaluate a checkpoint of an mmdet or mmseg config that uses mmvit_plugins backbones.

    python tools/test.py CONFIG CHECKPOINT [--trust-checkpoint] [--work-dir DIR] [--out PATH]
                         [--show-dir DIR] [--tta] [--cfg-options key=value ...]
                         [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is read with the safe loader of mmvit_plugins.checkpoint (tensors, plain
containers and mmengine's training state); --trust-checkpoint reads it with full unpickling.
--tta tests with the config's ``tta_pipeline`` and wraps the model in its ``tta_model``, as
mmdet's and mmseg's own tools/test.py do (configs/_base_/ define both).
Before the Runner is built, the test dataset's folders and CHECKPOINT are checked; missing ones
are named in one message, with what prepares them.
"""
import argparse
import logging
import os
import os.path as osp
import sys

from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmvit_plugins.checkpoint import safe_mmengine_loading
from mmvit_plugins.utils.preflight import MissingPathsError, check_paths
from mmvit_plugins.utils.runtime import (
    DictAction,
    config_scope,
    prepare_config,
    shut_down_distributed,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='read CHECKPOINT with full unpickling, which runs any code it names: only for a '
        "file you trust (by default tensors, plain containers and mmengine's training state "
        'load)')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument(
        '--out', help='mmdet: a .pkl file for the raw predictions; '
        'mmseg: a directory for the predicted label maps')
    parser.add_argument('--show-dir', help='directory where painted predictions are saved')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline and tta_model")
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def enable_visualization(cfg, scope: str, show_dir: str) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show-dir needs a "visualization" entry in default_hooks')
    hook['draw'] = True
    hook['interval'] = 1
    if scope == 'mmdet':
        hook['test_out_dir'] = osp.abspath(show_dir)
    else:
        cfg.visualizer['save_dir'] = osp.abspath(show_dir)


def add_output(cfg, scope: str, out: str) -> None:
    if scope == 'mmdet':
        if not out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out={out!r}: mmdet predictions are dumped to a .pkl/.pickle file')
        dump = dict(type='DumpDetResults', out_file_path=out)
        cfg.test_evaluator = _evaluators(cfg.test_evaluator) + [dump]
    else:
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True


def enable_tta(cfg, scope: str) -> None:
    """Test with ``cfg.tta_pipeline`` and wrap the model in ``cfg.tta_model``.

    mmdet's ``DetTTAModel`` merges boxes only (it refuses predictions with masks), so a model
    with a mask head is tested without it, on the box metric alone, and a warning says so.
    """
    missing = [key for key in ('tta_model', 'tta_pipeline') if not cfg.get(key)]
    if missing:
        raise ValueError(f'--tta needs {" and ".join(missing)} in the config (the base configs '
                         'under configs/_base_/ define both)')
    roi_head = cfg.model.get('roi_head') or {}
    if scope == 'mmdet' and roi_head.get('mask_head') and cfg.tta_model.type == 'DetTTAModel':
        roi_head.mask_head = roi_head.mask_roi_extractor = None
        for evaluator in _evaluators(cfg.test_evaluator):
            metric = evaluator.get('metric')
            if isinstance(metric, (list, tuple)) and 'segm' in metric:
                evaluator.metric = [m for m in metric if m != 'segm']
        print_log('--tta: DetTTAModel merges boxes only; testing without the mask head, on '
                  'the bbox metric', logger='current', level=logging.WARNING)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)


def _evaluators(evaluator) -> list:
    return list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = prepare_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    scope = config_scope(cfg)
    cfg.load_from = args.checkpoint
    if args.tta:
        enable_tta(cfg, scope)
    if args.show_dir:
        enable_visualization(cfg, scope, args.show_dir)
    if args.out:
        add_output(cfg, scope, args.out)
    check_paths(cfg, 'tools/test.py', ('test', ), checkpoints=[('CHECKPOINT', args.checkpoint)])
    with safe_mmengine_loading([args.checkpoint] if args.trust_checkpoint else []):
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.test()
    shut_down_distributed()


if __name__ == '__main__':
    try:
        main()
    except MissingPathsError as error:
        sys.exit(str(error))
