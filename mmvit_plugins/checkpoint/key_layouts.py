"""Which backbone family, and which layout of its keys, a state dict holds.

Each backbone declares its layouts (``checkpoint_layouts``, beside its public key rules) and
``mmvit_plugins.models.backbones`` registers them here; :func:`other_family` is the one check
that refuses weights of another family, for the mm backbones and the timm models alike.
"""
import re
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .state_dict import listed


class KeyLayout(NamedTuple):
    """How the keys of one family look in one layout (its public release, or this plugin's)."""
    name: str       # 'family' or 'family, layout'
    signature: str  # a key pattern (re.search) only this family and layout has
    blocks: str     # re.match pattern grouping (stage, block) or (block,) of the block keys
    width: str      # the key whose first dim is the embedding width

    @property
    def family(self) -> str:
        return self.name.split(',')[0]


_LAYOUTS: List[KeyLayout] = []


def register_key_layouts(layouts: Iterable[KeyLayout]) -> None:
    """Make ``layouts`` known to :func:`key_family` and :func:`describe_keys`. The order of
    registration is the order in which messages name the families, and breaks ties."""
    for layout in layouts:
        if not isinstance(layout, KeyLayout):
            raise TypeError(f'layouts must hold KeyLayout tuples, got {type(layout).__name__}')
        if layout not in _LAYOUTS:
            _LAYOUTS.append(layout)


def _layout(state_dict: Mapping[str, Any]) -> Optional[KeyLayout]:
    """The layout most keys of a state dict have the signature of; None if no key has one."""
    counts = [sum(1 for key in state_dict if re.search(layout.signature, key))
              for layout in _LAYOUTS]
    return _LAYOUTS[counts.index(max(counts))] if any(counts) else None


def key_family(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The registered backbone family (e.g. 'BOAT-Swin') whose keys a state dict holds, in any
    layout; None if it looks like none of them."""
    layout = _layout(state_dict)
    return None if layout is None else layout.family


def other_family(checkpoint: Mapping[str, Any],
                 model: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(checkpoint family, model family) when the keys of a checkpoint's state dict name another
    family than the model's state dict: such weights are never loaded, whatever share of them
    would match. None when both name the same family, or either names none."""
    family, own_family = key_family(checkpoint), key_family(model)
    if family is None or own_family is None or family == own_family:
        return None
    return family, own_family


def describe_keys(state_dict: Mapping[str, Any]) -> str:
    """Which family and layout the keys of a state dict look like, with width and depths."""
    layout = _layout(state_dict)
    if layout is None:
        families = list(dict.fromkeys(known.family for known in _LAYOUTS))
        named = (', '.join(families[:-1]) + ' or ' + families[-1] if len(families) > 1
                 else ''.join(families))
        return f'none of {named} (its first keys: {listed(list(state_dict), 4)})'
    details = []
    width = state_dict.get(layout.width)
    if isinstance(width, torch.Tensor) and width.dim() > 0:
        details.append(f'embed_dims {width.shape[0]}')
    blocks: Dict[int, int] = {}
    for key in state_dict:
        found = re.match(layout.blocks, key)
        if found:
            stage, block = (0, found.group(1)) if found.re.groups == 1 else found.groups()
            blocks[int(stage)] = max(blocks.get(int(stage), 0), int(block) + 1)
    if len(blocks) > 1:
        details.append(f'depths {tuple(blocks[s] for s in sorted(blocks))}')
    elif blocks:
        details.append(f'{max(blocks.values())} blocks')
    return layout.name + (f' ({", ".join(details)})' if details else '')
