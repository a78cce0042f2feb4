"""Evaluate an exported model (e.g. ``end2end.onnx``) on the model config's test set.

    python tools/deployment/test.py DEPLOY_CFG MODEL_CFG --model DIR/end2end.onnx
                                    [--device cpu] [--work-dir DIR] [--cfg-options k=v ...]
                                    [--show] [--show-dir DIR] [--interval N] [--wait-time S]
                                    [--log2file FILE] [--speed-test] [--warmup N]
                                    [--log-interval N] [--batch-size N]

The command line of mmdeploy's own ``tools/test.py``, on its Python API: the task processor
builds the dataset, the backend model and a test runner with the model config's evaluator, so
the metrics are the ones ``tools/test.py`` prints for the PyTorch checkpoint. For a static-shape
deploy config (``onnx_config.input_shape``), every ``Resize`` of the test pipeline resizes to
that shape (aspect ratio not kept), as the export did; a warning says so.
"""
import argparse
import os.path as osp
from copy import deepcopy
from typing import Dict, List, Optional, Sequence

from mmdeploy.apis import build_task_processor
from mmdeploy.utils import get_input_shape, get_root_logger
from mmdeploy.utils.timer import TimeCounter
from mmengine.config import DictAction

from mmvit_plugins.deployment import rewriters  # noqa: F401  (registers the rewriters)
from mmvit_plugins.deployment.utils import check_device, check_file, load_deploy_configs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='MMDeploy test (and eval) a backend.')
    parser.add_argument('deploy_cfg', help='deploy config path')
    parser.add_argument('model_cfg', help='model config path')
    parser.add_argument('--model', type=str, nargs='+', required=True,
                        help='input model files (e.g. DIR/end2end.onnx)')
    parser.add_argument('--device', help='device used for inference', default='cpu')
    parser.add_argument('--work-dir', default='./work_dir',
                        help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the model config, key=value pairs')
    parser.add_argument('--show', action='store_true', help='show results')
    parser.add_argument('--show-dir', help='directory where painted images will be saved')
    parser.add_argument('--interval', type=int, default=1,
                        help='visualize per interval samples')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='display time of every window (seconds)')
    parser.add_argument('--log2file', type=str, default=None,
                        help='log evaluation results and speed to file')
    parser.add_argument('--speed-test', action='store_true', help='activate speed test')
    parser.add_argument('--warmup', type=int, default=10,
                        help='warmup before counting inference elapse (with --speed-test)')
    parser.add_argument('--log-interval', type=int, default=100,
                        help='the interval between each log (with --speed-test)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='the batch size for test, overrides the test dataloader\'s')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size={args.batch_size} must be >= 1')
    return args


def resize_to_input_shape(pipeline: List[dict], input_shape: Sequence[int]) -> int:
    """Make every ``Resize`` of ``pipeline`` resize to ``input_shape`` (W, H) without keeping
    the aspect ratio, in place, as mmdeploy does for the export image; returns how many."""
    count = 0
    for transform in pipeline:
        if transform.get('type') == 'Resize':
            transform['scale'] = tuple(input_shape)
            transform['keep_ratio'] = False
            count += 1
    return count


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Run the tool; returns the evaluator's metrics."""
    args = parse_args(argv)
    logger = get_root_logger()
    try:
        deploy_cfg, model_cfg = load_deploy_configs(args.deploy_cfg, args.model_cfg,
                                                    args.cfg_options)
        for model_file in args.model:
            check_file(model_file, '--model', 'model file')
        check_device(args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'test.py: error: {err}') from err

    task_processor = build_task_processor(model_cfg, deploy_cfg, args.device)
    loaders = model_cfg['test_dataloader']
    loaders = deepcopy(loaders if isinstance(loaders, list) else [loaders])
    input_shape = get_input_shape(deploy_cfg)
    dataloaders = []
    for loader in loaders:
        if input_shape is not None:
            pipeline = loader['dataset'].get('pipeline', [])
            if resize_to_input_shape(pipeline, input_shape):
                logger.warning(f'static deploy config: the test pipeline resizes every image '
                               f'to {tuple(input_shape)} (W, H), aspect ratio not kept')
        loader['batch_size'] = args.batch_size
        loader['dataset'] = task_processor.build_dataset(loader['dataset'])
        dataloaders.append(task_processor.build_dataloader(loader))

    model = task_processor.build_backend_model(
        args.model, data_preprocessor_updater=task_processor.update_data_preprocessor)
    runner = task_processor.build_test_runner(
        model, osp.abspath(args.work_dir), log_file=args.log2file, show=args.show,
        show_dir=args.show_dir, wait_time=args.wait_time, interval=args.interval,
        dataloader=dataloaders[0] if len(dataloaders) == 1 else dataloaders)
    if args.speed_test:
        with TimeCounter.activate(warmup=args.warmup, log_interval=args.log_interval,
                                  with_sync=args.device != 'cpu', file=args.log2file,
                                  batch_size=args.batch_size):
            metrics = runner.test()
    else:
        metrics = runner.test()
    model.destroy()  # only backends that need explicit clean-up (e.g. Ascend) do anything
    return dict(metrics)


if __name__ == '__main__':
    main()
