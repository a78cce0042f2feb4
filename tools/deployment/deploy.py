"""Export a trained mmdet or mmseg model with mmdeploy, and check the export against PyTorch.

    python tools/deployment/deploy.py DEPLOY_CFG MODEL_CFG CHECKPOINT IMG --work-dir DIR
                                      [--device cpu] [--test-img IMG ...] [--trust-checkpoint]
                                      [--log-level INFO]

The command line of mmdeploy's own ``tools/deploy.py``, on its Python API: ``torch2onnx``
writes ``DIR/end2end.onnx`` (the name in the deploy config), ``to_backend`` converts it for the
deploy config's backend (nothing to do for onnxruntime), and then IMG (or every ``--test-img``)
runs through the PyTorch model and the exported one, and the agreement is printed:
segmentation: equal pixels of the label maps and the largest logit difference at the model's
input size; detection: matched detections (same label, box IoU > 0.99) with the largest box and
score differences. Deploy configs: ``configs/deploy/`` (mmdeploy's names and format).

mmvit_plugins registers its mmdeploy rewriters (exact adaptive average pooling for UperNet's
PPM). CHECKPOINT is read with the safe loader (``--trust-checkpoint``: full unpickling). The
export is written to a temporary file, checked with ``onnx.checker`` and only then moved to its
name, so a failed run never leaves an ``end2end.onnx`` behind.
"""
import argparse
import copy
import logging
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmdeploy.apis import build_task_processor, torch2onnx
from mmdeploy.apis.utils import to_backend
from mmdeploy.utils import (
    get_backend,
    get_codebase_config,
    get_input_shape,
    get_ir_config,
    get_root_logger,
    is_dynamic_shape,
)
from mmengine.config import Config
from mmengine.utils import mkdir_or_exist

from mmvit_plugins.checkpoint import safe_mmengine_loading
from mmvit_plugins.deployment import rewriters  # noqa: F401  (registers the rewriters)
from mmvit_plugins.deployment.agreement import (
    detection_agreement,
    format_detection,
    format_segmentation,
    segmentation_agreement,
)
from mmvit_plugins.deployment.utils import (
    check_device,
    check_file,
    check_image,
    load_deploy_configs,
    remove_quietly,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a model to a backend with mmdeploy')
    parser.add_argument('deploy_cfg', help='deploy config path (configs/deploy/...)')
    parser.add_argument('model_cfg', help='model config path')
    parser.add_argument('checkpoint', help='model checkpoint path')
    parser.add_argument('img', help='image used to convert the model')
    parser.add_argument('--test-img', nargs='+', help='images used to compare the models '
                        '(default: IMG)')
    parser.add_argument('--work-dir', default=os.getcwd(),
                        help='the dir to save logs and models')
    parser.add_argument('--device', default='cpu', help='device used for conversion')
    parser.add_argument('--log-level', default='INFO', choices=list(logging._nameToLevel),
                        help='set log level')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='read CHECKPOINT with full unpickling, which runs any code it '
                        'names: only for a file you trust')
    return parser.parse_args(argv)


def export(img: str, work_dir: str, deploy_cfg: Config, model_cfg: Config, checkpoint: str,
           device: str, trust_checkpoint: bool = False) -> str:
    """``torch2onnx`` into a temporary file, checked, then moved to the deploy config's
    ``save_file`` under ``work_dir``; returns its path. ``deploy_cfg`` has been checked by
    ``load_deploy_configs`` (ONNX is its IR)."""
    import onnx
    final = osp.join(work_dir, get_ir_config(deploy_cfg)['save_file'])
    stem = osp.splitext(osp.basename(final))[0]
    partial = f'.{stem}.partial-{os.getpid()}'
    partial_path = osp.join(work_dir, partial + '.onnx')
    try:
        with safe_mmengine_loading([checkpoint] if trust_checkpoint else []):
            torch2onnx(img, work_dir, partial + '.onnx', deploy_cfg, model_cfg, checkpoint,
                       device=device)
        onnx.checker.check_model(partial_path)
        os.replace(partial_path, final)
    finally:
        remove_quietly(partial_path)
    return final


def segmentation_outputs(backend_model, onnx_file: str,
                         inputs: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
    """Label map of the backend model and, for an ONNX graph that ends in ``ArgMax``, the
    logits it takes the argmax of (read with onnxruntime from the same file)."""
    output = backend_model.wrapper({backend_model.input_name: inputs})
    output = output[backend_model.output_names[0]]
    if output.shape[1] > 1:  # with_argmax=False: the graph returns logits
        return dict(labels=output.argmax(dim=1, keepdim=True), logits=output)
    return dict(labels=output, logits=onnx_argmax_input(onnx_file, inputs))


def onnx_argmax_input(onnx_file: str, inputs: torch.Tensor) -> Optional[torch.Tensor]:
    """The input of the ``ArgMax`` that produces the graph's first output, run with
    onnxruntime (None when the graph does not end that way or onnxruntime is missing)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    model = onnx.load(onnx_file)
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    if node is None or node.op_type != 'ArgMax':
        return None
    name = node.input[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    return torch.from_numpy(session.run([name], feed)[0])


def compare(task_processor, torch_model, backend_model, onnx_file: str, images: List[str],
            input_shape, codebase: str) -> Dict[str, float]:
    """Agreement of the two models over ``images`` (summed counts, worst differences)."""
    totals: Dict[str, float] = {}
    for image in images:
        data, _ = task_processor.create_input(image, input_shape)
        with torch.no_grad():
            if codebase == 'mmseg':
                pre = torch_model.data_preprocessor(copy.deepcopy(data), False)
                metas = [sample.metainfo for sample in pre['data_samples']]
                reference = torch_model.encode_decode(pre['inputs'], metas)
                out = segmentation_outputs(backend_model, onnx_file, pre['inputs'])
                results = [segmentation_agreement(out['labels'], reference, out['logits'])]
            else:
                references = torch_model.test_step(copy.deepcopy(data))
                predictions = backend_model.test_step(copy.deepcopy(data))
                results = [detection_agreement(p.pred_instances, r.pred_instances)
                           for p, r in zip(predictions, references)]
        for result in results:
            _accumulate(totals, result)
    return totals


def _accumulate(totals: Dict[str, float], result: Dict[str, float]) -> None:
    for key, value in result.items():
        if key not in totals:
            totals[key] = value
        elif key in ('matched', 'detections', 'reference'):
            totals[key] += value
        elif key == 'equal_pixels':
            pixels = totals['pixels'] + result['pixels']
            totals[key] = (totals[key] * totals['pixels'] + value * result['pixels']) / pixels
            totals['pixels'] = pixels
        elif key == 'pixels':
            continue
        elif key.startswith('min_'):
            totals[key] = float(np.fmin(totals[key], value))  # NaN (nothing to compare) ignored
        else:
            totals[key] = float(np.fmax(totals[key], value))


def check_args(args: argparse.Namespace) -> Tuple[Config, Config, List[str]]:
    """The deploy and model configs and the test images, or an error naming the argument."""
    deploy_cfg, model_cfg = load_deploy_configs(args.deploy_cfg, args.model_cfg)
    if '://' not in args.checkpoint:
        check_file(args.checkpoint, 'CHECKPOINT', 'checkpoint')
    check_image(args.img, 'IMG')
    images = args.test_img or [args.img]
    for image in images:
        check_image(image, '--test-img')
    check_device(args.device)
    return deploy_cfg, model_cfg, images


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the tool; returns ``onnx`` (path), ``backend_files`` and ``agreement``."""
    args = parse_args(argv)
    logger = get_root_logger()
    logger.setLevel(logging.getLevelName(args.log_level))
    try:
        deploy_cfg, model_cfg, images = check_args(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'deploy.py: error: {err}') from err
    mkdir_or_exist(osp.abspath(args.work_dir))
    codebase = get_codebase_config(deploy_cfg)['type']
    backend = get_backend(deploy_cfg)
    input_shape = get_input_shape(deploy_cfg)
    shape = 'dynamic' if is_dynamic_shape(deploy_cfg) else f'static {input_shape} (W, H)'

    start = time.time()
    onnx_file = export(args.img, args.work_dir, deploy_cfg, model_cfg, args.checkpoint,
                       args.device, args.trust_checkpoint)
    backend_files = to_backend(backend.value, [onnx_file], work_dir=args.work_dir,
                               deploy_cfg=deploy_cfg, log_level=logger.level,
                               device=args.device)
    print(f'[deploy] {onnx_file} ({backend.value}, {shape}) in {time.time() - start:.1f} s')

    task_processor = build_task_processor(model_cfg, deploy_cfg, args.device)
    with safe_mmengine_loading([args.checkpoint] if args.trust_checkpoint else []):
        torch_model = task_processor.build_pytorch_model(args.checkpoint)
    backend_model = task_processor.build_backend_model(
        backend_files, data_preprocessor_updater=task_processor.update_data_preprocessor)
    agreement = compare(task_processor, torch_model, backend_model, onnx_file, images,
                        input_shape, codebase)
    text = format_segmentation(agreement) if codebase == 'mmseg' else \
        format_detection(agreement)
    print(f'[deploy] PyTorch vs {backend.value} on {len(images)} image(s): {text}')
    return dict(onnx=onnx_file, backend_files=list(backend_files), agreement=agreement)


if __name__ == '__main__':
    main()
