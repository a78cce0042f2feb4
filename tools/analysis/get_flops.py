"""Parameters and FLOPs of a config's model (or of its backbone) at a given input size.

    python tools/analysis/get_flops.py CONFIG [--shape H [W]] [--part model|backbone]
                                       [--cfg-options key=value ...]

Counted with ``mmengine.analysis`` (one multiply-add = one FLOP, as in the OpenMMLab model
zoos), plus a counter for ``scaled_dot_product_attention`` (q k^T and attn v), which mmengine
does not count and every backbone here uses. Operators it has no counter for (softmax, sorting,
``mmcv`` RoI ops) count as zero; they are listed when ``--verbose`` is given.
"""
import argparse
import logging
from math import prod
from typing import Any, Callable, List, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from mmengine.registry import MODELS
from torch import nn

from mmvit_plugins.utils.runtime import DictAction, config_scope, prepare_config


class TensorForward(nn.Module):
    """Wraps a detector/segmentor so that ``forward(inputs)`` runs its ``mode='tensor'`` path
    (backbone, neck and heads without post-processing) on a batch of one fixed image size."""

    def __init__(self, model: nn.Module, scope: str, shape: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.scope = scope
        self.shape = shape

    def forward(self, inputs: torch.Tensor):
        if self.scope == 'mmseg':
            from mmseg.structures import SegDataSample as Sample
        else:
            from mmdet.structures import DetDataSample as Sample
        h, w = self.shape
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
        samples = [Sample(metainfo=meta) for _ in range(inputs.shape[0])]
        return self.model(inputs, samples, mode='tensor')


def sdpa_flop_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of ``scaled_dot_product_attention``: q (..., L, D) k^T and attn v."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def count_flops(module: nn.Module, inputs: torch.Tensor, verbose: bool = False) -> int:
    """FLOPs (multiply-adds) of one forward of ``module`` on ``inputs``."""
    analyzer = FlopAnalyzer(module, (inputs, ))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_handle)
    analyzer.unsupported_ops_warnings(verbose).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analyzer.total()
    if verbose:
        print('uncounted operators:', dict(analyzer.unsupported_ops()))
    return total


def parse_shape(values) -> Tuple[int, int]:
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f'--shape={values} must be one or two positive ints (H [W])')
    return (values[0], values[-1])


def build_forward(config: str, shape: Tuple[int, int], part: str,
                  cfg_options=None) -> Tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """The module to measure (eval mode) and a function making an input batch of a given size."""
    if part not in ('model', 'backbone'):
        raise ValueError(f"part={part!r}; allowed values: 'model', 'backbone'")
    cfg = prepare_config(config, cfg_options)
    model = MODELS.build(cfg.model).eval()
    module = model.backbone if part == 'backbone' else TensorForward(model, config_scope(cfg),
                                                                     shape)
    in_channels = getattr(model.backbone, 'in_channels', 3)
    return module, lambda batch: torch.randn(batch, in_channels, *shape)


def main() -> None:
    parser = argparse.ArgumentParser(description='Params and FLOPs of a config')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 512],
                        help='input H [W] (default: 512 512)')
    parser.add_argument('--part', choices=['model', 'backbone'], default='model')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--verbose', action='store_true', help='list uncounted operators')
    args = parser.parse_args()
    shape = parse_shape(args.shape)
    if not args.verbose:
        logging.getLogger('mmengine').setLevel(logging.ERROR)
    module, make_inputs = build_forward(args.config, shape, args.part, args.cfg_options)
    flops = count_flops(module, make_inputs(1), args.verbose)
    params = sum(p.numel() for p in module.parameters())
    print(f'config: {args.config}\npart: {args.part}\ninput: 1x3x{shape[0]}x{shape[1]}\n'
          f'params: {params / 1e6:.2f} M ({params:,})\nFLOPs: {flops / 1e9:.2f} G')


if __name__ == '__main__':
    main()
