"""Inference latency, throughput and peak memory of a config's model (or backbone).

    python tools/analysis/benchmark.py CONFIG [--shape H [W]] [--batch-size 1] [--part model]
                                       [--warmup 3] [--iters 10] [--device cpu|cuda]
                                       [--cfg-options key=value ...]

Times the ``mode='tensor'`` forward (no post-processing) on random images. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA, and the growth of the process's peak resident set
size (``ru_maxrss``) over the measurement on CPU.
"""
import argparse
import resource
import time

import torch
from get_flops import build_forward, parse_shape

from mmvit_plugins.utils.runtime import DictAction


def main() -> None:
    parser = argparse.ArgumentParser(description='Latency/throughput/peak memory of a config')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 512])
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--part', choices=['model', 'backbone'], default='model')
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
    shape = parse_shape(args.shape)
    module, make_inputs = build_forward(args.config, shape, args.part, args.cfg_options)
    module = module.to(args.device)
    inputs = make_inputs(args.batch_size).to(args.device)
    cuda = args.device.startswith('cuda')

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(args.warmup):
            module(inputs)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        for _ in range(args.iters):
            module(inputs)
        sync()
        elapsed = time.perf_counter() - start
    if cuda:
        peak = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA, allocated)'
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        peak = (f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process '
                f'peak RSS (+{grown / 2**10:.0f} MiB during the measurement)')
    latency = elapsed / args.iters
    print(f'config: {args.config}\npart: {args.part}, device: {args.device}, '
          f'torch threads: {torch.get_num_threads()}\n'
          f'input: {args.batch_size}x3x{shape[0]}x{shape[1]}, {args.iters} iterations after '
          f'{args.warmup} warm-up\nlatency: {latency * 1e3:.1f} ms/batch\n'
          f'throughput: {args.batch_size / latency:.2f} images/s\npeak memory: {peak}')


if __name__ == '__main__':
    main()
