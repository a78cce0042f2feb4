"""Reading public checkpoints and loading them with a report of what did not match."""
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from mmengine.logging import MMLogger, print_log
from torch import nn

# Containers the public releases use, in order of preference: timm-style training checkpoints
# (.pth.tar) carry 'state_dict' and often 'state_dict_ema'; DeiT/Swin-style .pth carry 'model';
# OpenMMLab checkpoints carry 'state_dict'.
_EMA_KEY = 'state_dict_ema'
_CONTAINER_KEYS = ('model', 'state_dict', 'module')
_WRAPPER_PREFIXES = ('module.', 'backbone.')


def allow_full_checkpoint_loading() -> None:
    """Let ``torch.load`` read full training checkpoints on torch >= 2.6.

    torch 2.6 made ``weights_only=True`` the default; mmengine's checkpoints (message hub, numpy
    scalars, configs) are then refused with an ``UnpicklingError``. Checkpoints given to the
    project's tools are the user's own or public releases, so restore the old default unless the
    user chose otherwise through the same environment variable.
    """
    os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


def load_checkpoint_file(path: str, map_location: str = 'cpu') -> dict:
    """``torch.load`` a local file on any torch version (see above)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path!r}')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only argument
        return torch.load(path, map_location=map_location)


def extract_state_dict(checkpoint: Mapping,
                       use_ema: bool = False) -> 'OrderedDict[str, torch.Tensor]':
    """The model weights inside a checkpoint, without DataParallel/mm wrapper prefixes.

    Args:
        checkpoint: what ``torch.load`` returned: a state dict, or a dict holding one under
            ``model`` / ``state_dict`` / ``state_dict_ema`` / ``module``.
        use_ema: take ``state_dict_ema`` when the checkpoint has one.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    state = None
    if use_ema and _EMA_KEY in checkpoint:
        state = checkpoint[_EMA_KEY]
    else:
        for key in _CONTAINER_KEYS:
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                state = checkpoint[key]
                break
    if state is None:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise ValueError('checkpoint holds no state dict: expected tensors or one of the '
                             f'keys {(_EMA_KEY,) + _CONTAINER_KEYS}, found keys '
                             f'{sorted(checkpoint)[:10]}')
        state = checkpoint
    out = OrderedDict()
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


class LoadReport(NamedTuple):
    """Keys of a state-dict load that did not match the model, each with the reason."""
    missing: List[str]       # in the model, not in the checkpoint
    unexpected: List[str]    # in the checkpoint, no such key in the model
    mismatched: List[str]    # 'key: checkpoint (a, b) vs model (c, d)'

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        parts = []
        if self.mismatched:
            parts.append('shape mismatch (not loaded): ' + ', '.join(self.mismatched))
        if self.missing:
            parts.append('missing in checkpoint (left at initialisation): '
                         + ', '.join(self.missing))
        if self.unexpected:
            parts.append('unexpected in checkpoint (ignored): ' + ', '.join(self.unexpected))
        return '; '.join(parts) if parts else 'all keys matched'


def load_state_dict_report(module: nn.Module,
                           state_dict: Mapping[str, torch.Tensor],
                           ignore_missing: Sequence[str] = (),
                           logger: Optional[MMLogger] = None) -> LoadReport:
    """Load what matches, and log every key that does not, by name and reason.

    Args:
        ignore_missing: substrings of model keys that a public checkpoint is known not to have
            (e.g. the per-output norms a classification model lacks); they are not reported.
    """
    own: Dict[str, torch.Tensor] = module.state_dict()
    loadable, mismatched, unexpected = OrderedDict(), [], []
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(
                f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            loadable[key] = value
    module.load_state_dict(loadable, strict=False)
    missing = [k for k in own if k not in state_dict and not any(s in k for s in ignore_missing)]
    report = LoadReport(missing, unexpected, mismatched)
    level = 'current' if logger is None else logger
    print_log(f'{type(module).__name__}: loaded {len(loadable)}/{len(own)} tensors; '
              f'{report.format()}', logger=level)
    return report
