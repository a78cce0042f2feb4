"""The weights inside a checkpoint: the raw or EMA state dict of every public container layout,
without wrapper prefixes, refused when it holds NaN or infinite values."""
import logging
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MMLogger, print_log

Logger = Union[MMLogger, str]

# Containers the public releases use: timm-style training checkpoints (.pth.tar) carry
# 'state_dict' and often 'state_dict_ema' (or only that); DeiT/Swin-style .pth carry 'model' (and
# 'model_ema'); OpenMMLab checkpoints carry 'state_dict'.
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_CONTAINER_KEYS = ('model', 'state_dict', 'module')
_WRAPPER_PREFIX = 'module.'
_BACKBONE_PREFIX = 'backbone.'


def listed(items: Sequence[str], limit: Optional[int] = 10) -> str:
    """``items`` joined by commas, the first ``limit`` of them and a count of the others."""
    if limit is None or len(items) <= limit:
        return ', '.join(items)
    return ', '.join(items[:limit]) + f' ... and {len(items) - limit} more'


def _first_mapping(checkpoint: Mapping, keys: Sequence[str]) -> Tuple[Optional[str], Any]:
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return key, checkpoint[key]
    return None, None


def check_finite(state_dict: Mapping[str, Any], name: str = 'checkpoint') -> None:
    """Refuse NaN or infinite values, naming the tensors that hold them."""
    bad = [key for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.device.type != 'meta'
           and (value.is_floating_point() or value.is_complex())
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f'checkpoint {name!r} holds NaN or infinite values in {len(bad)} '
                         f'tensor(s): {listed(bad)}; refusing to load it (a diverged training '
                         'run or a corrupt file?)')


def extract_state_dict(checkpoint: Any, use_ema: bool = False, prefix: Optional[str] = None,
                       name: str = 'checkpoint',
                       logger: Logger = 'current') -> 'OrderedDict[str, torch.Tensor]':
    """The finite model weights inside a checkpoint, without DataParallel/mm wrapper prefixes.

    Args:
        checkpoint: what ``load_checkpoint_file`` returned: a state dict, or a dict holding one
            under ``model`` / ``state_dict`` / ``module`` and/or ``state_dict_ema`` /
            ``model_ema``. The raw weights are taken by default, the EMA ones with ``use_ema``
            or when they are the only ones (logged either way).
        prefix: keep only the keys under this prefix (without it); by default the ``backbone.``
            keys of a full mmdet/mmseg model, or all keys when there are none.
        name: the checkpoint's path or URL, for messages.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'checkpoint {name!r} must hold a dict, got {type(checkpoint).__name__}')
    raw_key, raw = _first_mapping(checkpoint, _CONTAINER_KEYS)
    ema_key, ema = _first_mapping(checkpoint, _EMA_KEYS)
    if ema_key and (use_ema or raw_key is None):
        key, state = ema_key, ema
        reason = 'use_ema=True' if use_ema else 'the checkpoint holds no other weights'
        print_log(f'{name}: using the EMA weights {ema_key!r} ({reason})', logger=logger)
    elif raw_key:
        key, state = raw_key, raw
        if use_ema:
            print_log(f'{name}: use_ema=True but the checkpoint has no {_EMA_KEYS[0]!r} or '
                      f'{_EMA_KEYS[1]!r}; using {raw_key!r}', logger=logger, level=logging.WARNING)
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        key, state = None, checkpoint
    else:
        raise ValueError(f'checkpoint {name!r} holds no state dict: expected tensors or one of '
                         f'the keys {_CONTAINER_KEYS + _EMA_KEYS}, found keys '
                         f'{sorted(map(str, checkpoint))[:10]}')
    out = OrderedDict()
    for param, value in state.items():
        while param.startswith(_WRAPPER_PREFIX):
            param = param[len(_WRAPPER_PREFIX):]
        out[param] = value
    wanted = prefix.rstrip('.') + '.' if prefix else None
    if wanted is None and any(k.startswith(_BACKBONE_PREFIX) for k in out):
        wanted = _BACKBONE_PREFIX
    if wanted:
        kept = OrderedDict((k[len(wanted):], v) for k, v in out.items() if k.startswith(wanted))
        if not kept:
            where = repr(key) if key else 'the top level'
            raise ValueError(f'checkpoint {name!r} has no key under prefix={prefix!r} (in '
                             f'{where}); its first keys: {listed(list(out), 5)}')
        if len(kept) < len(out):
            print_log(f'{name}: took the {len(kept)} tensors under {wanted!r}, left out '
                      f'{len(out) - len(kept)} others', logger=logger)
        out = kept
    check_finite(out, name)
    return out
