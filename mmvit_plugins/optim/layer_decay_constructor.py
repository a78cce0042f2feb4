"""Layer-wise learning-rate decay for plain-ViT backbones (the BEiT/ViTDet fine-tuning recipe)."""
import logging
import re
from typing import Dict, List

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

_EMBEDDINGS = ('patch_embed', 'pos_embed', 'cls_token')
_NO_DECAY = ('pos_embed', 'cls_token')
_BLOCK = re.compile(r'blocks\.(\d+)\.')


def get_vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a parameter of a model whose backbone is a plain ViT (e.g. RefinerViT).

    Patch/position embedding and class token: 0; ``blocks.i``: i + 1; anything else (the
    backbone's pyramid and out norms, necks, heads): ``num_layers + 1``. ``name`` is relative to
    the model (``backbone.`` prefix) or to the backbone itself.
    """
    if name.startswith('backbone.'):
        name = name[len('backbone.'):]
    if name.split('.', 1)[0] in _EMBEDDINGS:
        return 0
    match = _BLOCK.match(name)
    if match is None:
        return num_layers + 1
    block = int(match.group(1))
    if block >= num_layers:
        raise ValueError(f'parameter {name!r} is in block {block}, but paramwise_cfg has '
                         f'num_layers={num_layers}; allowed values: the backbone depth')
    return block + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Per-layer learning rates ``lr * layer_decay_rate ** (num_layers + 1 - layer_id)``.

    ``paramwise_cfg=dict(num_layers=<backbone depth>, layer_decay_rate=<(0, 1]>)``; layer ids as
    :func:`get_vit_layer_id`. No weight decay for 1-D parameters (norms, biases, per-channel
    scales), ``pos_embed`` and ``cls_token``. Frozen parameters are left out. Example::

        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(num_layers=16, layer_decay_rate=0.75))
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        num_layers = self.paramwise_cfg.get('num_layers')
        rate = self.paramwise_cfg.get('layer_decay_rate')
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f'paramwise_cfg num_layers={num_layers!r} is invalid; allowed '
                             'values: a positive int, the depth of the backbone')
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f'paramwise_cfg layer_decay_rate={rate!r} is invalid; allowed '
                             'values: a number in (0, 1]')
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.rsplit('.', 1)[-1] in _NO_DECAY
            layer_id = get_vit_layer_id(name, num_layers)
            group_name = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if group_name not in groups:
                scale = rate**(num_layers + 1 - layer_id)
                group = dict(params=[], param_names=[], group_name=group_name, lr_scale=scale,
                             lr=self.base_lr * scale)
                if no_decay:
                    group['weight_decay'] = 0.
                elif self.base_wd is not None:
                    group['weight_decay'] = self.base_wd
                groups[group_name] = group
            groups[group_name]['params'].append(param)
            groups[group_name]['param_names'].append(name)
        print_log(
            'layer-wise lr decay: ' + ', '.join(
                f'{g["group_name"]} x{g["lr_scale"]:.4g} ({len(g["params"])} params)'
                for g in groups.values()), logger='current', level=logging.DEBUG)
        params.extend(groups.values())
