"""What every backbone of the plugin shares: argument checks, pretrained loading, freezing."""
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn

from mmvit_plugins.utils.checkpoint import (
    extract_state_dict,
    load_checkpoint_file,
    load_state_dict_report,
)


def resolve_arch(arch: Union[str, Mapping], arch_zoo: Mapping[str, Mapping],
                 required_keys: Iterable[str]) -> dict:
    """An arch preset by name (aliases allowed), or a custom dict holding every required key."""
    required = set(required_keys)
    if isinstance(arch, str):
        if arch.lower() not in arch_zoo:
            raise ValueError(f'arch={arch!r} is not a preset; allowed values: '
                             f'{sorted(arch_zoo)} or a dict with keys {sorted(required)}')
        return dict(arch_zoo[arch.lower()])
    if not isinstance(arch, Mapping):
        raise ValueError(f'arch must be a preset name or a dict, got {type(arch).__name__}')
    missing = required - set(arch)
    if missing:
        raise ValueError(f'custom arch is missing keys {sorted(missing)}; '
                         f'a custom arch needs {sorted(required)}')
    return dict(arch)


def check_out_indices(out_indices: Union[int, Sequence[int]], num_outputs: int) -> Tuple[int, ...]:
    """Normalise ``out_indices`` (negative indices allowed) and reject out-of-range values."""
    if isinstance(out_indices, int):
        out_indices = (out_indices, )
    indices = []
    for index in out_indices:
        if not isinstance(index, int) or not -num_outputs <= index < num_outputs:
            raise ValueError(f'out_indices={tuple(out_indices)} is invalid: each index must be an '
                             f'int in [{-num_outputs}, {num_outputs - 1}]')
        indices.append(index % num_outputs)
    if len(set(indices)) != len(indices):
        raise ValueError(f'out_indices={tuple(out_indices)} holds duplicates')
    return tuple(sorted(indices))


def check_heads(widths: Sequence[int], heads: Sequence[int], name: str = 'num_heads') -> None:
    """Every stage width must split evenly into its heads."""
    for stage, (width, num_heads) in enumerate(zip(widths, heads)):
        if num_heads <= 0 or width % num_heads:
            raise ValueError(f'{name}[{stage}]={num_heads} does not divide the width {width} '
                             f'of stage {stage}; allowed values: divisors of {width}')


def check_input(x: torch.Tensor, in_channels: int) -> None:
    """Images must come as (B, in_channels, H, W) with B, H, W > 0."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'input must be a 4-D tensor (B, C, H, W), got {shape}')
    if x.shape[1] != in_channels:
        raise ValueError(f'input has {x.shape[1]} channels, the backbone was built with '
                         f'in_channels={in_channels}')
    if 0 in x.shape:
        raise ValueError(f'input has an empty dimension: {tuple(x.shape)}')


def drop_path_rates(rate: float, num_blocks: int) -> List[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks."""
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f'{name}={value} is out of range; allowed values: [{low}, {high}]')


class PyramidBackbone(BaseModule):
    """Base of the plugin's backbones: pretrained loading with key conversion and a report of
    unmatched keys, ``frozen_stages`` with a ``train()`` override, and ``norm_eval``.

    A subclass implements ``_frozen_modules(frozen_stages)`` and, where its public checkpoints
    use other key names, ``convert_checkpoint``. Keys that the public classification models do
    not have (the per-output norms) are listed in ``_keys_not_in_public_checkpoints``.
    """
    _keys_not_in_public_checkpoints: Tuple[str, ...] = ('out_norm',)

    def __init__(self, frozen_stages: int = -1, norm_eval: bool = False,
                 use_ema: bool = False, init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(init_cfg=init_cfg)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.use_ema = use_ema

    # -- pretrained weights -----------------------------------------------------------------
    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map a public checkpoint's keys/tensors onto this module's. Identity by default."""
        return state_dict

    def init_weights(self) -> None:
        """Initialise, or load ``init_cfg=dict(type='Pretrained', checkpoint=...)``.

        The init_cfg may also hold ``prefix`` (take the keys under it), ``map_location`` and
        ``trust_checkpoint``. The checkpoint is read with the safe loader of
        ``mmvit_plugins.utils.checkpoint`` (tensors and plain containers);
        ``trust_checkpoint=True`` unpickles everything, which runs whatever code the file
        names: only for a file you trust. Raises a ValueError naming the checkpoint and the
        family its keys look like when fewer than half of the tensors load.
        """
        pretrained = isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'
        if not pretrained:
            super().init_weights()
            self._freeze_stages()
            return
        allowed = ('type', 'checkpoint', 'prefix', 'map_location', 'trust_checkpoint')
        unknown = sorted(set(self.init_cfg) - set(allowed))
        if unknown:
            raise ValueError(f"init_cfg=dict(type='Pretrained') got unknown keys {unknown}; "
                             f'allowed keys: {list(allowed)}')
        checkpoint = self.init_cfg.get('checkpoint')
        if not checkpoint:
            raise ValueError("init_cfg=dict(type='Pretrained') needs checkpoint=<path or URL>")
        trust = self.init_cfg.get('trust_checkpoint', False)
        if not isinstance(trust, bool):
            raise ValueError(f'init_cfg trust_checkpoint={trust!r} is invalid; allowed values: '
                             'True, False')
        logger = MMLogger.get_current_instance()
        loaded = load_checkpoint_file(checkpoint, self.init_cfg.get('map_location', 'cpu'),
                                      trust=trust)
        state = extract_state_dict(loaded, use_ema=self.use_ema,
                                   prefix=self.init_cfg.get('prefix'), name=checkpoint,
                                   logger=logger)
        self.load_report = load_state_dict_report(
            self, state, ignore_missing=self._keys_not_in_public_checkpoints, logger=logger,
            checkpoint=checkpoint, convert=self.convert_checkpoint, min_loaded=0.5)
        self._is_init = True
        self._freeze_stages()

    # -- freezing ----------------------------------------------------------------------------
    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """Modules (and parameters wrapped in modules) frozen for ``frozen_stages``."""
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        """``requires_grad=False`` on the frozen parts, and eval mode for them.

        Called at the end of construction, after ``init_weights`` and in ``train()``: the
        parameters must be frozen before a DDP wrapper registers which ones are trained.
        """
        if self.frozen_stages < 0:
            return
        for module in self._frozen_modules(self.frozen_stages):
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'PyramidBackbone':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
