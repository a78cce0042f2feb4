"""LayerDecayOptimWrapperConstructor: per-layer lr multipliers and weight decay exemptions."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, DefaultScope
from torch import nn

from mmvit_plugins.models.backbones import RefinerViT
from mmvit_plugins.optim import LayerDecayOptimWrapperConstructor, get_vit_layer_id

NUM_LAYERS = 4


class Detector(nn.Module):
    """The parameter layout of an mm model: backbone, neck, head."""

    def __init__(self, frozen_stages: int = -1):
        super().__init__()
        self.backbone = RefinerViT(
            arch=dict(embed_dims=24, num_layers=NUM_LAYERS, num_heads=2, mlp_ratio=2.),
            window_size=4, global_attn_indexes=(), frozen_stages=frozen_stages)
        self.neck = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 2)


def _build(model: nn.Module, rate: float = 0.5):
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
               constructor='LayerDecayOptimWrapperConstructor',
               paramwise_cfg=dict(num_layers=NUM_LAYERS, layer_decay_rate=rate))
    return build_optim_wrapper(model, cfg)


def _groups_by_param(optim_wrapper) -> dict:
    return {name: group for group in optim_wrapper.optimizer.param_groups
            for name in group['param_names']}


@pytest.mark.parametrize('name,layer_id', [
    ('backbone.patch_embed.conv1.weight', 0), ('backbone.pos_embed', 0),
    ('backbone.cls_token', 0), ('backbone.blocks.0.attn.qkv.weight', 1),
    ('backbone.blocks.3.mlp.scale_channel', 4), ('backbone.pyramid.level0.0.weight', 5),
    ('backbone.out_norm2.weight', 5), ('neck.weight', 5), ('decode_head.conv_seg.bias', 5),
    ('blocks.2.norm1.weight', 3), ('patch_embed.proj.bias', 0),
])
def test_layer_ids(name, layer_id):
    assert get_vit_layer_id(name, NUM_LAYERS) == layer_id


def test_registered_in_mmengine_root_and_visible_from_mmdet_and_mmseg():
    assert OPTIM_WRAPPER_CONSTRUCTORS.get('LayerDecayOptimWrapperConstructor') is \
        LayerDecayOptimWrapperConstructor
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMDET
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMSEG
    for scope, registry in (('mmdet', MMDET), ('mmseg', MMSEG)):
        with DefaultScope.overwrite_default_scope(scope):
            assert registry.get('LayerDecayOptimWrapperConstructor') is \
                LayerDecayOptimWrapperConstructor


def test_lr_multipliers_and_weight_decay_from_an_optim_wrapper_config():
    model = Detector()
    groups = _groups_by_param(_build(model, rate=0.5))
    assert set(groups) == {name for name, _ in model.named_parameters()}
    for name, group in groups.items():
        layer_id = get_vit_layer_id(name, NUM_LAYERS)
        assert group['lr'] == pytest.approx(1e-3 * 0.5**(NUM_LAYERS + 1 - layer_id)), name
    assert groups['backbone.patch_embed.conv1.weight']['lr'] == pytest.approx(1e-3 / 32)
    assert groups['backbone.blocks.3.attn.v.weight']['lr'] == pytest.approx(1e-3 / 2)
    assert groups['head.weight']['lr'] == pytest.approx(1e-3)
    no_decay = ['backbone.pos_embed', 'backbone.blocks.0.norm1.weight',
                'backbone.blocks.0.attn.qkv.bias', 'backbone.blocks.1.mlp.scale_channel',
                'backbone.blocks.1.attn.adapt_bn.weight', 'head.bias', 'backbone.out_norm0.bias']
    for name in no_decay:
        assert groups[name]['weight_decay'] == 0., name
    for name in ('backbone.blocks.0.attn.qkv.weight', 'backbone.patch_embed.proj.weight',
                 'neck.weight'):
        assert groups[name]['weight_decay'] == 0.05, name


def test_optimizer_steps_and_frozen_parameters_are_left_out():
    model = Detector(frozen_stages=1)
    model.train()
    optim_wrapper = _build(model)
    groups = _groups_by_param(optim_wrapper)
    assert not any(n.startswith(('backbone.patch_embed', 'backbone.blocks.0.')) for n in groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = model.backbone(torch.randn(1, 3, 32, 32))
    optim_wrapper.backward(sum(o.mean() for o in out))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    optim_wrapper.step()
    # AdamW's first step: p * (1 - lr * wd) - lr * g / (|g| + eps), with the group's lr and wd
    stepped = set()
    for name, p in model.named_parameters():
        if name not in groups:
            assert not p.requires_grad and torch.equal(p, before[name]), name
            continue
        if name not in grads:  # the neck and head: not in this forward, not stepped
            assert torch.equal(p, before[name]), name
            continue
        lr, decay = groups[name]['lr'], groups[name]['weight_decay']
        g = grads[name]
        expected = before[name] * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-3 * lr, msg=name)
        stepped.add(name)
    assert {'backbone.blocks.1.attn.v.weight', 'backbone.pyramid.level0.0.weight'} <= stepped


@pytest.mark.parametrize('paramwise_cfg,match', [
    (dict(layer_decay_rate=0.9), 'num_layers'),
    (dict(num_layers=0, layer_decay_rate=0.9), 'num_layers'),
    (dict(num_layers=2, layer_decay_rate=0.9), 'num_layers'),  # model has 4 blocks
    (dict(num_layers=4, layer_decay_rate=1.5), 'layer_decay_rate'),
    (dict(num_layers=4), 'layer_decay_rate'),
])
def test_bad_paramwise_cfg(paramwise_cfg, match):
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3),
               constructor='LayerDecayOptimWrapperConstructor', paramwise_cfg=paramwise_cfg)
    with pytest.raises(ValueError, match=match):
        build_optim_wrapper(Detector(), cfg)
