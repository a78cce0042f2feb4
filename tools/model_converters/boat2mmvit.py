"""Convert a public BOAT checkpoint (github.com/mahaoyuHKU/pytorch-boat) for BOATSwin/BOATCSWin.

    python tools/model_converters/boat2mmvit.py boat_swin_tiny.pth boat-swin-t_mmvit.pth \
        --model swin --arch tiny [--window-size 7] [--use-ema]
    python tools/model_converters/boat2mmvit.py boat_cswin_tiny.pth.tar boat-cswin-t_mmvit.pth \
        --model cswin --arch tiny [--use-ema]

Keys are renamed by the backbone's ``convert_checkpoint``: the classifier head and BOAT-Swin's
``attn_mask`` buffers are dropped, the final ``norm`` becomes ``out_norm3`` and relative position
bias tables are resized to ``--window-size``. The result holds ``state_dict`` (backbone keys) for
``init_cfg=dict(type='Pretrained', checkpoint=...)``; every key that does not match the backbone
is printed by name.
"""
import argparse
import logging

import torch
from mmengine.logging import print_log

from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin
from mmvit_plugins.utils.checkpoint import (
    extract_state_dict,
    load_checkpoint_file,
    load_state_dict_report,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='public checkpoint (.pth with model / .pth.tar)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--model', required=True, choices=['swin', 'cswin'])
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--window-size', type=int, default=7,
                        help='BOAT-Swin window size of the converted checkpoint')
    parser.add_argument('--use-ema', action='store_true', help='take state_dict_ema if present')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.model == 'swin':
        backbone = BOATSwin(args.arch, window_size=args.window_size)
    else:
        backbone = BOATCSWin(args.arch)
    state = extract_state_dict(load_checkpoint_file(args.src), use_ema=args.use_ema)
    converted = backbone.convert_checkpoint(dict(state))
    report = load_state_dict_report(backbone, converted,
                                    ignore_missing=backbone._keys_not_in_public_checkpoints)
    if not report.ok:
        print_log(f'unmatched keys: {report.format()}', logger='current', level=logging.WARNING)
    torch.save({'state_dict': converted,
                'meta': dict(source=args.src, model=args.model, arch=args.arch)}, args.dst)
    print_log(f'saved {len(converted)} tensors to {args.dst}', logger='current')


if __name__ == '__main__':
    main()
