"""Loading a state dict into a module with a report of every key that did not match, and the
refusals: weights of another family, or too small a share of the module's tensors."""
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from .key_layouts import describe_keys, other_family
from .state_dict import Logger, listed


class LoadReport(NamedTuple):
    """Keys of a state-dict load that did not match the model, each with the reason."""
    missing: List[str]       # in the model, not in the checkpoint
    unexpected: List[str]    # in the checkpoint, no such key in the model
    mismatched: List[str]    # 'key: checkpoint (a, b) vs model (c, d)'
    loaded: int = 0          # tensors of the model that were loaded
    total: int = 0           # tensors of the model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: Optional[int] = None) -> str:
        """Every unmatched key with its reason (at most ``limit`` of each kind)."""
        parts = []
        if self.mismatched:
            parts.append('shape mismatch (not loaded): ' + listed(self.mismatched, limit))
        if self.missing:
            parts.append('missing in checkpoint (left at initialisation): '
                         + listed(self.missing, limit))
        if self.unexpected:
            parts.append('unexpected in checkpoint (ignored): '
                         + listed(self.unexpected, limit))
        return '; '.join(parts) if parts else 'all keys matched'


Convert = Callable[[Dict[str, Any]], Dict[str, Any]]


def convert_state_dict(module: nn.Module, convert: Convert, state_dict: Mapping[str, Any],
                       name: str) -> Dict[str, Any]:
    """``convert(state_dict)``, its errors re-raised naming the checkpoint and its family."""
    try:
        return convert(dict(state_dict))
    except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as err:
        raise ValueError(
            f'checkpoint {name!r} cannot be converted for {type(module).__name__} '
            f'({type(err).__name__}: {err}); its keys look like {describe_keys(state_dict)}, '
            f'the model is {describe_keys(module.state_dict())}') from err


def _match(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any],
           ignore_missing: Tuple[str, ...]) -> Tuple['OrderedDict[str, torch.Tensor]', LoadReport]:
    """The tensors of ``state_dict`` that fit ``own`` by key and shape, and the report."""
    loadable, unexpected, mismatched = OrderedDict(), [], []
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif not isinstance(value, torch.Tensor):
            mismatched.append(f'{key}: checkpoint holds a {type(value).__name__}, not a tensor')
        elif own[key].shape != value.shape:
            mismatched.append(
                f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            loadable[key] = value
    missing = [k for k in own if k not in state_dict and not k.startswith(ignore_missing)]
    return loadable, LoadReport(missing, unexpected, mismatched, len(loadable), len(own))


def load_state_dict_report(module: nn.Module,
                           state_dict: Mapping[str, Any],
                           ignore_missing: Sequence[str] = (),
                           logger: Optional[Logger] = None,
                           checkpoint: Optional[str] = None,
                           convert: Optional[Convert] = None,
                           min_loaded: float = 0.0,
                           source: Optional[Mapping[str, Any]] = None) -> LoadReport:
    """Load what matches, and log every key that does not, by name and reason.

    The report is logged as INFO when every key matched, else as WARNING.

    Args:
        ignore_missing: prefixes of model keys that a public checkpoint is known not to have
            (e.g. ``out_norm``: the per-output norms a classification model lacks); they are
            not reported.
        checkpoint: the checkpoint's path or URL, for messages.
        convert: maps the checkpoint's keys/tensors onto the module's first (a backbone's
            ``convert_checkpoint``); errors in it are reported with the checkpoint's name.
        min_loaded: the smallest share of the module's tensors that must load; below it a
            ValueError names the checkpoint, the count and the family its keys look like. The
            same ValueError refuses a checkpoint whose keys name another family than the
            module's (whatever share would load): training never starts from a mixture.
        source: the state dict as the checkpoint holds it, when ``state_dict`` was converted
            already (for the family in messages).
    """
    name = checkpoint or 'state dict'
    source = state_dict if source is None else source
    if convert is not None:
        state_dict = convert_state_dict(module, convert, state_dict, name)
    own: Dict[str, torch.Tensor] = module.state_dict()
    loadable, report = _match(own, state_dict, tuple(ignore_missing))
    cls = type(module).__name__
    families = other_family(source, own)
    if families or len(loadable) < min_loaded * len(own):
        why = (f'its keys are {families[0]} weights, the model is {families[1]}: weights of '
               f'another family are never loaded ({len(loadable)} of its {len(own)} tensors '
               'would match)'
               if families else
               f'only {len(loadable)} of its {len(own)} tensors matched (fewer than '
               f'{min_loaded:.0%})')
        raise ValueError(
            f'checkpoint {name!r} does not fit {cls}: {why}. The checkpoint looks like '
            f'{describe_keys(source)}; the model is {describe_keys(own)}. Use the backbone type '
            'and arch the checkpoint was trained with (public checkpoints: see '
            f'tools/model_converters/). Unmatched: {report.format(limit=5)}')
    module.load_state_dict(loadable, strict=False)
    print_log(f'{cls}: loaded {len(loadable)}/{len(own)} tensors from {name}; {report.format()}',
              logger='current' if logger is None else logger,
              level=logging.INFO if report.ok else logging.WARNING)
    return report
