"""Latency, throughput and peak memory of a config's model (or backbone): inference, or a
whole training step with ``--train``.

    python tools/analysis/benchmark.py CONFIG [--shape H [W]] [--batch-size 1] [--part model]
                                       [--train] [--warmup 3] [--iters 10] [--device cpu|cuda]
                                       [--cfg-options key=value ...]

Inference times the ``mode='tensor'`` forward (no post-processing) on random images.
``--train`` times one optimisation step of the whole model as training runs it: the config's
data preprocessor, ``mode='loss'`` forward, backward and the config's optimizer wrapper, on a
synthetic labelled batch (random label maps for mmseg; random boxes and masks, 5 per image, for
mmdet). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, and the growth of the
process's peak resident set size (``ru_maxrss``) over the measurement on CPU.
"""
import argparse
import resource
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from get_flops import build_forward, parse_shape
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch import nn

from mmvit_plugins.utils.runtime import DictAction, config_scope, prepare_config

NUM_BOXES = 5


def find_num_classes(node: Any) -> Optional[int]:
    """The first ``num_classes`` in a model config (decode head, or RoI box head)."""
    if isinstance(node, dict):
        if isinstance(node.get('num_classes'), int):
            return node['num_classes']
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        for value in node:
            found = find_num_classes(value)
            if found is not None:
                return found
    return None


def synthetic_batch(scope: str, shape: Tuple[int, int], batch: int, num_classes: int) -> Dict:
    """A seeded labelled batch in the layout the codebase's data preprocessor takes."""
    h, w = shape
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch, (3, h, w), num_items=[NUM_BOXES] * batch,
                              num_classes=num_classes, with_mask=True)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, h, w), generator=generator))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_train_step(config: str, shape: Tuple[int, int], batch: int, device: str,
                     cfg_options=None) -> Tuple[nn.Module, Callable[[], None]]:
    """The config's model in train mode and one training step of it on a synthetic batch."""
    cfg = prepare_config(config, cfg_options)
    num_classes = find_num_classes(cfg.model)
    if num_classes is None:
        raise ValueError(f'{config}: no num_classes in the model config; --train needs one to '
                         'make labels')
    # one process, as mmengine's Runner does without a launcher: SyncBN layers become BN
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(device).train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    data = model.data_preprocessor(
        synthetic_batch(config_scope(cfg), shape, batch, num_classes), training=True)

    def step() -> None:
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        optim_wrapper.update_params(loss)

    return model, step


def build_inference_step(config: str, shape: Tuple[int, int], batch: int, part: str,
                         device: str, cfg_options=None) -> Callable[[], None]:
    module, make_inputs = build_forward(config, shape, part, cfg_options)
    module = module.to(device)
    inputs = make_inputs(batch).to(device)

    def step() -> None:
        with torch.no_grad():
            module(inputs)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description='Latency/throughput/peak memory of a config')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 512])
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--part', choices=['model', 'backbone'], default='model')
    parser.add_argument('--train', action='store_true',
                        help='time a training step (losses, backward, optimizer) instead')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    for name in ('batch_size', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")}={getattr(args, name)} must be >= 1')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device={args.device}: CUDA is not available; allowed values: cpu')
    if args.train and args.part != 'model':
        parser.error(f'--train times the whole model; --part={args.part} is not allowed with it')
    shape = parse_shape(args.shape)
    if args.train:
        _, step = build_train_step(args.config, shape, args.batch_size, args.device,
                                args.cfg_options)
    else:
        step = build_inference_step(args.config, shape, args.batch_size, args.part,
                                    args.device, args.cfg_options)
    cuda = args.device.startswith('cuda')

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if cuda:
        peak = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA, allocated)'
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        peak = (f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process '
                f'peak RSS (+{grown / 2**10:.0f} MiB during the measurement)')
    latency = elapsed / args.iters
    mode = 'train step (losses, backward, optimizer)' if args.train else 'inference'
    print(f'config: {args.config}\nmode: {mode}\npart: {args.part}, device: {args.device}, '
          f'torch threads: {torch.get_num_threads()}\n'
          f'input: {args.batch_size}x3x{shape[0]}x{shape[1]}, {args.iters} iterations after '
          f'{args.warmup} warm-up\nlatency: {latency * 1e3:.1f} ms/batch\n'
          f'throughput: {args.batch_size / latency:.2f} images/s\npeak memory: {peak}')


if __name__ == '__main__':
    main()
