"""BOAT-Swin and BOAT-CSWin backbones: API, any input size, checkpoints, parameter counts."""
import re

import pytest
import torch

from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin, boat
from mmvit_plugins.models.backbones.boat import CrossShapedWindowAttention, _rename
from mmvit_plugins.models.layers import group_layout
from mmvit_plugins.utils.op_count import HOST_SYNC_OPS, dispatched_ops

TINY = {
    BOATSwin: dict(arch=dict(embed_dims=8, depths=[2, 2, 2, 1], num_heads=[1, 1, 2, 2])),
    BOATCSWin: dict(arch=dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2],
                              split_sizes=[1, 2, 7, 7])),
}
MODELS = list(TINY)


def _tiny(cls, **kwargs):
    return cls(**{**TINY[cls], **kwargs})


def _params(model, skip: str = 'out_norm') -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if not (skip and name.startswith(skip)))


# Public models without classifier head and final norm (docs/backbones/boat.md).
PUBLIC_PARAMS = {
    (BOATSwin, 'tiny'): 29_494_650, (BOATSwin, 'small'): 54_388_362,
    (BOATSwin, 'base'): 96_585_912, (BOATCSWin, 'tiny'): 25_876_928,
    (BOATCSWin, 'small'): 39_598_464, (BOATCSWin, 'base'): 88_858_176,
}


@pytest.mark.parametrize('cls', MODELS)
def test_tiny_preset_parameter_count(cls):
    model = cls(arch='tiny')
    norms = sum(2 * w for w in model.num_features)
    assert _params(model, skip='') == PUBLIC_PARAMS[(cls, 'tiny')] + norms


@pytest.mark.parametrize('cls,arch', [(c, a) for c, a in PUBLIC_PARAMS if a != 'tiny'])
def test_larger_preset_parameter_counts(cls, arch):
    with torch.device('meta'):
        model = cls(arch=arch)
    assert _params(model) == PUBLIC_PARAMS[(cls, arch)]


@pytest.mark.parametrize('cls', MODELS)
def test_warm_forward_does_not_wait_for_the_device(cls):
    """A forward and backward copy nothing to the host: no stalls on a GPU, and the shapes stay
    static for graph capture; the first forward at a size too, which builds the group layouts
    and masks from the sizes with tensor operations (it used to read them back)."""
    model = _tiny(cls)
    x = torch.randn(2, 3, 250, 330)
    group_layout.cache_clear()
    first = dispatched_ops(lambda: model(x))
    assert not HOST_SYNC_OPS & set(first)
    ops = dispatched_ops(lambda: sum(out.mean() for out in model(x)).backward())
    assert ops['aten::argsort'] > 0 and not HOST_SYNC_OPS & set(ops)


def test_padded_windows_produce_no_subnormal_floats():
    """At initialisation (zero qkv bias) padded queries must output exact zeros, not
    e^-100-weighted values: subnormal floats slow every later CPU matmul by 10-50x."""
    torch.manual_seed(0)
    # head width 32 as in the presets: with the -100 mask, the tiny models' 8-wide heads
    # happened to give no subnormal outputs, these do. In training mode, because there the
    # relative position bias needs its gradient and SDPA takes its unfused path on CPU (the
    # fused inference kernel happens to flush such values to zero).
    model = BOATSwin(arch=dict(embed_dims=64, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4]),
                     drop_path_rate=0.)
    subnormal = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda mod, args, out: subnormal.append(
                int(((args[0] != 0) & (args[0].abs() < torch.finfo(args[0].dtype).tiny)).sum())))
    model(torch.randn(1, 3, 60, 76))
    assert subnormal and not any(subnormal)


def test_cross_shaped_padding_equals_cropped_windows():
    """Stripes of a map whose width is not a multiple of the split size."""
    torch.manual_seed(0)
    attn = CrossShapedWindowAttention(8, 2, [(None, 3)]).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    out = attn(x, attn.key_masks(x))
    # the last stripe (column 6) alone, as a 5x1 map through the same module
    attn.windows = ((None, None), )
    last = x[:, :, 6:]
    torch.testing.assert_close(out[:, :, 6:], attn(last, attn.key_masks(last)), atol=1e-12,
                               rtol=0)


def test_cross_shaped_masks_are_built_once_per_stage(monkeypatch):
    """Padded stripes in every stage (a 100x124 input): one mask per branch and stage, however
    many blocks the stage has (2 + 2 + 2 + 1 branches)."""
    calls = []
    build = boat.window_padding_mask
    monkeypatch.setattr(boat, 'window_padding_mask', lambda *a: calls.append(a) or build(*a))
    arch = dict(embed_dims=8, depths=[2, 2, 3, 2], num_heads=[2, 2, 2, 2],
                split_sizes=[3, 3, 7, 7])
    model = BOATCSWin(arch=arch).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 100, 124))
    assert len(calls) == 7


def test_cswin_heads_must_split_over_the_stripe_branches():
    arch = dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
                split_sizes=[1, 2, 7, 7])
    with pytest.raises(ValueError, match='even'):
        BOATCSWin(arch=arch)


def test_last_stage_window_option_equals_global_at_224():
    torch.manual_seed(0)
    model = _tiny(BOATCSWin).eval()
    windowed = _tiny(BOATCSWin, last_stage_attn='window').eval()
    windowed.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model(x)[3], windowed(x)[3])
    x = torch.randn(1, 3, 320, 320)
    assert not torch.allclose(model(x)[3], windowed(x)[3])


# ---- public checkpoints ----------------------------------------------------------------------
def _public_swin_keys(depths):
    """Key names of the public BOAT-Swin at 224 (window 7), written from its source."""
    keys = ['patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight',
            'patch_embed.norm.bias', 'norm.weight', 'norm.bias', 'head.weight', 'head.bias']
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            keys += [p + k for k in (
                'norm1.weight', 'norm1.bias', 'attn.relative_position_bias_table',
                'attn.relative_position_index', 'attn.qkv.weight', 'attn.qkv.bias',
                'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
                'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')]
            if j % 2 and i < 3:  # shifted blocks of stages larger than one window
                keys += [p + k for k in (
                    'attn_mask', 'attnC.qkv.weight', 'attnC.qkv.bias', 'attnC.proj.weight',
                    'attnC.proj.bias', 'attnC.get_v.weight', 'attnC.get_v.bias',
                    'norm4.weight', 'norm4.bias')]
        if i < 3:
            keys += [f'layers.{i}.downsample.{k}' for k in
                     ('reduction.weight', 'norm.weight', 'norm.bias')]
    return keys


def _public_cswin_keys(depths):
    """Key names of the public BOAT-CSWin, written from its source."""
    keys = ['stage1_conv_embed.0.weight', 'stage1_conv_embed.0.bias',
            'stage1_conv_embed.2.weight', 'stage1_conv_embed.2.bias', 'norm.weight',
            'norm.bias', 'head.weight', 'head.bias']
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f'stage{i + 1}.{j}.'
            keys += [p + k for k in (
                'qkv.weight', 'qkv.bias', 'norm1.weight', 'norm1.bias', 'proj.weight',
                'proj.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias',
                'norm2.weight', 'norm2.bias')]
            keys += [p + f'attns.{b}.get_v.{t}' for b in range(1 if i == 3 else 2)
                     for t in ('weight', 'bias')]
            if j % 2 == 0:
                keys += [p + k for k in (
                    'content_attn.qkv.weight', 'content_attn.qkv.bias',
                    'content_attn.proj.weight', 'content_attn.proj.bias',
                    'content_attn.get_v.weight', 'content_attn.get_v.bias', 'norm3.weight',
                    'norm3.bias')]
        if i < 3:
            keys += [f'merge{i + 1}.{k}' for k in
                     ('conv.weight', 'conv.bias', 'norm.weight', 'norm.bias')]
    return keys


def _fake_public_checkpoint(model, public_keys):
    """Random tensors under the public names; shapes from the model through its converter."""
    own = model.state_dict()
    state = {}
    for key in public_keys:
        converted = _rename({key: None}, model.public_key_rules)
        if not converted:  # dropped keys (head, attn_mask): any shape
            state[key] = torch.randn(3, 3)
            continue
        target, = converted
        assert target in own, f'{key} -> {target} is not a model key'
        state[key] = torch.randn(own[target].shape) if own[target].is_floating_point() \
            else own[target].clone()
    return state


@pytest.mark.parametrize('cls,keys', [(BOATSwin, _public_swin_keys),
                                      (BOATCSWin, _public_cswin_keys)])
@pytest.mark.parametrize('layout', ['pth_model', 'tar_state_dict', 'tar_ema'])
def test_loads_public_checkpoints(tmp_path, cls, keys, layout):
    depths = TINY[cls]['arch']['depths']
    model = _tiny(cls)
    public = _fake_public_checkpoint(model, keys(depths))
    if layout == 'pth_model':
        checkpoint, path, use_ema = {'model': public}, tmp_path / 'boat.pth', False
    else:
        prefixed = {f'module.{k}': v for k, v in public.items()}
        checkpoint = {'state_dict': {k: v * 0 for k, v in prefixed.items()}
                      if layout == 'tar_ema' else prefixed, 'epoch': 300}
        if layout == 'tar_ema':
            checkpoint['state_dict_ema'] = prefixed
        path, use_ema = tmp_path / 'boat.pth.tar', layout == 'tar_ema'
    torch.save(checkpoint, path)
    model = _tiny(cls, use_ema=use_ema, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    report = model.load_report
    assert report.ok, report.format()
    own = model.state_dict()
    converted = model.convert_checkpoint(public)
    for key, value in converted.items():
        torch.testing.assert_close(own[key], value, msg=key)
    loaded = set(converted)
    assert {k for k in own if k not in loaded} == {
        k for k in own if re.match(r'out_norm[012]\.', k)}


def test_bias_table_of_another_window_size_is_resized():
    model = _tiny(BOATSwin, window_size=12)
    public = {'layers.0.blocks.0.attn.relative_position_bias_table': torch.randn(169, 1),
              'layers.0.blocks.0.attn.relative_position_index': torch.zeros(49, 49).long()}
    converted = model.convert_checkpoint(public)
    own = model.state_dict()
    for key, value in converted.items():
        assert value.shape == own[key].shape
