"""Convert a public Refiner-ViT checkpoint (github.com/zhoudaquan/Refiner_ViT) to a RefinerViT one.

    python tools/model_converters/refiner2mmvit.py <downloaded file> \
        checkpoints/refiner-vit-l_mmvit.pth --arch large [--pretrain-img-size 224] \
        [--with-cls-token] [--use-ema] [--trust-checkpoint]

The only public checkpoint is Refiner-ViT-L at 448x448 (a Google Drive file the upstream README
links without naming it; see docs/model_zoo.md); weights of the other sizes that you pretrain
yourself convert the same way with ``--arch small`` / ``--arch medium``.

The upstream file keeps its published name; the converted one is named as the configs expect it,
``checkpoints/refiner-vit-<size>_mmvit.pth``. The classifier heads and final norm are dropped, the
refiner/value keys renamed and the position embedding resized to ``--pretrain-img-size`` (see
``RefinerViT.convert_checkpoint``). The weights are ``model`` / ``state_dict``
(``state_dict_ema`` with ``--use-ema``, or when it is the only one). The source is read with the
safe loader (tensors and plain containers only, see ``mmvit_plugins.checkpoint``);
``--trust-checkpoint`` unpickles everything, for a file you trust. The result holds
``state_dict`` for ``init_cfg=dict(type='Pretrained', checkpoint=...)``; every key that does not
match the backbone is logged by name, fewer than half of the backbone's tensors matched is an
error, and the sha256 of the written file is printed.
"""
import argparse
import os.path as osp
import sys
from typing import Optional, Sequence

import torch

from mmvit_plugins.models.backbones import RefinerViT

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from conversion import add_converter_arguments, convert_checkpoint_file  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_converter_arguments(parser, 'checkpoints/refiner-vit-s_mmvit.pth')
    parser.add_argument('--arch', default='small', choices=['small', 'medium', 'large'])
    parser.add_argument('--pretrain-img-size', type=int, default=224,
                        help='position embedding size of the converted checkpoint')
    parser.add_argument('--with-cls-token', action='store_true',
                        help='keep the class token (global-attention RefinerViT only)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Convert; print and return the sha256 of the written file (as sha256sum prints it)."""
    args = parse_args(argv)
    with torch.device('meta'):  # no initialisation: every tensor is overwritten or reported
        backbone = RefinerViT(args.arch, pretrain_img_size=args.pretrain_img_size,
                              with_cls_token=args.with_cls_token,
                              global_attn_indexes='all' if args.with_cls_token else None)
    backbone.to_empty(device='cpu')
    digest = convert_checkpoint_file(backbone, args.src, args.dst, use_ema=args.use_ema,
                                     trust=args.trust_checkpoint, meta=dict(arch=args.arch))
    print(f'{digest}  {args.dst}')
    return digest


if __name__ == '__main__':
    main()
