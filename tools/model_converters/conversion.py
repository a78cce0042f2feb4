"""What both model converters do, imported by them (not a script): their shared arguments, and
reading, mapping, checking and saving a public checkpoint."""
import argparse
import os
import os.path as osp
from typing import Optional

import torch
from mmengine.logging import print_log
from torch import nn

from mmvit_plugins.checkpoint import (
    convert_state_dict,
    extract_state_dict,
    file_sha256,
    load_checkpoint_file,
    load_state_dict_report,
)


def add_converter_arguments(parser: argparse.ArgumentParser, example_dst: str) -> None:
    """The arguments both model converters take: ``src``, ``dst``, ``--use-ema`` and
    ``--trust-checkpoint``."""
    parser.add_argument('src', help='public checkpoint (.pth / .pth.tar), as published')
    parser.add_argument('dst', help=f'output path, e.g. {example_dst}')
    parser.add_argument('--use-ema', action='store_true',
                        help='take state_dict_ema when the checkpoint also has raw weights')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle everything in SRC (runs any code it names): only for a '
                        'file you trust; by default only tensors and plain containers load')


def convert_checkpoint_file(backbone: nn.Module, src: str, dst: str, use_ema: bool = False,
                            trust: bool = False, meta: Optional[dict] = None) -> str:
    """What the model converters do: read ``src`` safely, map it with the backbone's
    ``convert_checkpoint``, check that at least half of the backbone's tensors load (every
    unmatched key is logged), and save ``{'state_dict', 'meta'}`` to ``dst``.

    Returns:
        The sha256 of the written file.
    """
    state = extract_state_dict(load_checkpoint_file(src, trust=trust), use_ema=use_ema, name=src)
    converted = convert_state_dict(backbone, backbone.convert_checkpoint, state, src)
    load_state_dict_report(backbone, converted,
                           getattr(backbone, '_keys_not_in_public_checkpoints', ()),
                           checkpoint=src, min_loaded=0.5, source=state)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save({'state_dict': converted, 'meta': dict(meta or {}, source=src)}, dst)
    print_log(f'saved {len(converted)} tensors to {dst}', logger='current')
    return file_sha256(dst)
