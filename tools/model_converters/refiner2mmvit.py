"""Convert a public Refiner-ViT checkpoint (github.com/zhoudaquan/Refiner_ViT) to a RefinerViT one.

    python tools/model_converters/refiner2mmvit.py Refiner_ViT_S.pth.tar refiner-vit-s_mmvit.pth \
        --arch small [--pretrain-img-size 224] [--with-cls-token] [--use-ema]

The classifier heads and final norm are dropped, the refiner/value keys renamed and the position
embedding resized to ``--pretrain-img-size`` (see ``RefinerViT.convert_checkpoint``). The result
holds ``state_dict`` for ``init_cfg=dict(type='Pretrained', checkpoint=...)``; every key that does
not match the backbone is printed by name.
"""
import argparse
import logging

import torch
from mmengine.logging import print_log

from mmvit_plugins.models.backbones import RefinerViT
from mmvit_plugins.utils.checkpoint import (
    extract_state_dict,
    load_checkpoint_file,
    load_state_dict_report,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='public checkpoint (.pth / .pth.tar)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--arch', default='small', choices=['small', 'medium', 'large'])
    parser.add_argument('--pretrain-img-size', type=int, default=224,
                        help='position embedding size of the converted checkpoint')
    parser.add_argument('--with-cls-token', action='store_true',
                        help='keep the class token (global-attention RefinerViT only)')
    parser.add_argument('--use-ema', action='store_true', help='take state_dict_ema if present')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with torch.device('meta'):
        backbone = RefinerViT(args.arch, pretrain_img_size=args.pretrain_img_size,
                              with_cls_token=args.with_cls_token,
                              global_attn_indexes='all' if args.with_cls_token else None)
    state = extract_state_dict(load_checkpoint_file(args.src), use_ema=args.use_ema)
    converted = backbone.convert_checkpoint(dict(state))
    backbone.to_empty(device='cpu')
    report = load_state_dict_report(backbone, converted,
                                    ignore_missing=backbone._keys_not_in_public_checkpoints)
    if not report.ok:
        print_log(f'unmatched keys: {report.format()}', logger='current', level=logging.WARNING)
    torch.save({'state_dict': converted, 'meta': dict(source=args.src, arch=args.arch)},
               args.dst)
    print_log(f'saved {len(converted)} tensors to {args.dst}', logger='current')


if __name__ == '__main__':
    main()
