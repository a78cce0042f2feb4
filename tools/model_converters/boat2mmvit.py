"""Convert a public BOAT checkpoint (github.com/mahaoyuHKU/pytorch-boat) for BOATSwin/BOATCSWin.

    python tools/model_converters/boat2mmvit.py tiny.pth checkpoints/boat-swin-t_mmvit.pth \
        --model swin --arch tiny [--window-size 7] [--use-ema] [--trust-checkpoint]
    python tools/model_converters/boat2mmvit.py cswin_tiny.pth.tar \
        checkpoints/boat-cswin-t_mmvit.pth --model cswin --arch tiny [--use-ema]

The upstream files keep their published names; the converted ones are named as the configs
expect them, ``checkpoints/<backbone>-<size>_mmvit.pth``. Keys are renamed by the backbone's
``convert_checkpoint``: the classifier head and BOAT-Swin's ``attn_mask`` buffers are dropped,
the final ``norm`` becomes ``out_norm3`` and relative position bias tables are resized to
``--window-size``. The weights are ``model`` / ``state_dict`` (``state_dict_ema`` with
``--use-ema``, or when it is the only one). The source is read with the safe loader (tensors and
plain containers only, see ``mmvit_plugins.checkpoint``); ``--trust-checkpoint`` unpickles
everything, for a file you trust. The result holds ``state_dict`` (backbone keys) for
``init_cfg=dict(type='Pretrained', checkpoint=...)``; every key that does not match the backbone
is logged by name, fewer than half of the backbone's tensors matched is an error, and the sha256
of the written file is printed.
"""
import argparse
import os.path as osp
import sys
from typing import Optional, Sequence

from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from conversion import add_converter_arguments, convert_checkpoint_file  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_converter_arguments(parser, 'checkpoints/boat-swin-t_mmvit.pth')
    parser.add_argument('--model', required=True, choices=['swin', 'cswin'])
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--window-size', type=int, default=7,
                        help='BOAT-Swin window size of the converted checkpoint')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Convert; print and return the sha256 of the written file (as sha256sum prints it)."""
    args = parse_args(argv)
    if args.model == 'swin':
        backbone = BOATSwin(args.arch, window_size=args.window_size)
    else:
        backbone = BOATCSWin(args.arch)
    digest = convert_checkpoint_file(backbone, args.src, args.dst, use_ema=args.use_ema,
                                     trust=args.trust_checkpoint,
                                     meta=dict(model=args.model, arch=args.arch))
    print(f'{digest}  {args.dst}')
    return digest


if __name__ == '__main__':
    main()
