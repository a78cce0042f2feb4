"""onnxruntime against PyTorch on CPU: latency of exported models, one row per config.

    python tools/analysis/benchmark_deploy.py CONFIG [CONFIG ...] [--deploy-cfg DEPLOY_CFG]
                                              [--shape H [W]] [--warmup 2] [--iters 5]
                                              [--threads N] [--work-dir DIR]

Each model config (randomly initialised; weights do not change the time) is exported with
mmdeploy's ``torch2onnx`` and the deploy config (default: the dynamic segmentation or
instance-seg onnxruntime config of configs/deploy/, after the config's codebase), traced at
``--shape``. Then the same preprocessed image runs through PyTorch (the model's ``predict``,
post-processing included, no gradients) and through an onnxruntime session of ``end2end.onnx``
(CPU provider), alternately, ``--iters`` times each after ``--warmup``; the table shows the
median latencies, their ratio and the export time. Both use ``--threads`` intra-op threads.
"""
import argparse
import copy
import os
import os.path as osp
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from mmdeploy.apis import build_task_processor, torch2onnx
from mmengine.config import Config

from mmvit_plugins.deployment import rewriters  # noqa: F401  (registers the rewriters)
from mmvit_plugins.deployment.utils import load_deploy_configs

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_DEPLOY = {
    'mmseg': 'configs/deploy/mmseg/segmentation_onnxruntime_dynamic.py',
    'mmdet': 'configs/deploy/mmdet/instance-seg/instance-seg_onnxruntime_dynamic.py',
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='+', help='model configs')
    parser.add_argument('--deploy-cfg', help='deploy config (default: per codebase)')
    parser.add_argument('--shape', type=int, nargs='+', default=[512],
                        help='input H [W] (default 512)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--work-dir', help='keep the ONNX files in DIR/<config name>/ (default: '
                        'a temporary dir)')
    args = parser.parse_args()
    if len(args.shape) not in (1, 2) or min(args.shape) < 32:
        parser.error(f'--shape={args.shape}: one or two sizes >= 32')
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error('--iters and --threads must be >= 1, --warmup >= 0')
    return args


def _model_config(path: str, shape) -> Config:
    """The config with a random backbone (no checkpoint) and an unresized test image."""
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    for transform in cfg.test_pipeline:
        if transform['type'] == 'Resize':
            transform.update(scale=(shape[1], shape[0]), keep_ratio=True)
    return cfg


def benchmark(config: str, deploy_cfg: str, shape, warmup: int, iters: int,
              work_dir: str) -> Dict[str, float]:
    import cv2
    import numpy as np
    import onnxruntime as ort
    cfg = _model_config(config, shape)
    scope = cfg.default_scope
    deploy_path = deploy_cfg or osp.join(REPO, DEFAULT_DEPLOY[scope])
    tmp_cfg = osp.join(work_dir, 'model.py')
    cfg.dump(tmp_cfg)
    deploy, model_cfg = load_deploy_configs(deploy_path, tmp_cfg)
    image = osp.join(work_dir, 'image.png')
    rng = np.random.default_rng(0)
    cv2.imwrite(image, rng.integers(0, 256, (*shape, 3), dtype=np.uint8))

    torch.manual_seed(0)
    task_processor = build_task_processor(model_cfg, deploy, 'cpu')
    model = task_processor.build_pytorch_model(None)
    checkpoint = osp.join(work_dir, 'model.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    start = time.perf_counter()
    torch2onnx(image, work_dir, 'end2end.onnx', deploy, model_cfg, checkpoint, device='cpu')
    export_s = time.perf_counter() - start

    data, _ = task_processor.create_input(image, None)
    data = model.data_preprocessor(copy.deepcopy(data), False)
    inputs, samples = data['inputs'], data['data_samples']
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(osp.join(work_dir, 'end2end.onnx'), options,
                                   providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: inputs.numpy()}

    def run_torch() -> None:
        with torch.no_grad():
            model.predict(inputs, copy.deepcopy(samples))

    times: Dict[str, List[float]] = {'pytorch': [], 'onnxruntime': []}
    for i in range(warmup + iters):
        for name, run in (('pytorch', run_torch), ('onnxruntime', lambda: session.run(None, feed))):
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    pytorch = statistics.median(times['pytorch']) * 1e3
    onnxruntime = statistics.median(times['onnxruntime']) * 1e3
    return dict(pytorch_ms=pytorch, onnxruntime_ms=onnxruntime, export_s=export_s,
                ratio=onnxruntime / pytorch)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape) if len(args.shape) == 2 else (args.shape[0], args.shape[0])
    print(f'input {shape[0]}x{shape[1]}, batch 1, {args.threads} threads, torch '
          f'{torch.__version__}, median of {args.iters} (after {args.warmup} warm-up)')
    print(f"| {'config':<44} | PyTorch ms | onnxruntime ms | ort / PyTorch | export s |")
    print(f"|{'-' * 46}|-----------:|---------------:|--------------:|---------:|")
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = tmp if args.work_dir is None else osp.join(
                args.work_dir, osp.splitext(osp.basename(config))[0])
            os.makedirs(work_dir, exist_ok=True)
            row = benchmark(config, args.deploy_cfg, shape, args.warmup, args.iters, work_dir)
        print(f'| {osp.basename(config):<44} | {row["pytorch_ms"]:10.1f} | '
              f'{row["onnxruntime_ms"]:14.1f} | {row["ratio"]:13.2f} | {row["export_s"]:8.1f} |',
              flush=True)


if __name__ == '__main__':
    main()
