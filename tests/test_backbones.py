"""The contract every registered backbone keeps, at tiny width (timm's tests/test_models.py
style): registry, pyramid shapes at any size, batch independence, determinism, out_indices,
frozen_stages (DDP-safe), with_cp, argument checks, input checks, checkpoint report.
Per-backbone files test only what is specific (parity, FSLA, GLD, refiner)."""
import math
import re

import pytest
import torch
from mmengine.registry import DefaultScope

from mmvit_plugins.models import backbones
from tests.conftest import TINY_BACKBONES

NAMES = sorted(backbones.__all__)
STRIDES = (4, 8, 16, 32)

# What frozen_stages=1 freezes: the stem and the first stage (with its output norm); for the
# plain ViT the patch and position embeddings and the first block.
FROZEN_BY_ONE = {
    'BOATSwin': ('patch_embed.', 'stages.0.', 'out_norm0.'),
    'BOATCSWin': ('patch_embed.', 'stages.0.', 'out_norm0.'),
    'MAFormer': ('patch_embed.', 'stages.0.', 'out_norm0.'),
    'RefinerViT': ('patch_embed.', 'pos_embed', 'blocks.0.'),
}


# The largest frozen_stages of each backbone (the plain ViT counts blocks).
LARGEST_FROZEN = {'BOATSwin': 4, 'BOATCSWin': 4, 'MAFormer': 4,
                  'RefinerViT': TINY_BACKBONES['RefinerViT']['arch']['num_layers']}


def build(name: str, **kwargs) -> torch.nn.Module:
    return getattr(backbones, name)(**{**TINY_BACKBONES[name], **kwargs})


def expected_shapes(model, batch: int, hw) -> list:
    return [(batch, model.num_features[i], math.ceil(hw[0] / STRIDES[i]),
             math.ceil(hw[1] / STRIDES[i])) for i in model.out_indices]


def test_every_backbone_is_covered():
    assert NAMES and set(NAMES) == set(TINY_BACKBONES) == set(FROZEN_BY_ONE) == \
        set(LARGEST_FROZEN)


@pytest.mark.parametrize('codebase', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('name', NAMES)
def test_registered_in_mmdet_and_mmseg(codebase, name):
    registry = __import__(f'{codebase}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(codebase):
        assert registry.get(name) is getattr(backbones, name)
        model = registry.build(dict(type=name, **TINY_BACKBONES[name]))
    assert isinstance(model, getattr(backbones, name))


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('hw', [(1, 1), (30, 226), (61, 97), (200, 328)])
def test_pyramid_shapes_at_any_size(name, hw):
    model = build(name)
    outs = model(torch.randn(2, 3, *hw))
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, 2, hw)
    assert all(torch.isfinite(o).all() and o.dtype == torch.float32 for o in outs)


@pytest.mark.parametrize('name', NAMES)
def test_backward_reaches_every_parameter(name):
    model = build(name, drop_path_rate=0.1)
    x = torch.randn(1, 3, 72, 104, requires_grad=True)
    sum(o.square().mean() for o in model(x)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize('name', NAMES)
def test_images_of_a_batch_are_independent_and_results_deterministic(name):
    model = build(name).double().eval()
    x = torch.randn(3, 3, 61, 97, dtype=torch.float64)
    with torch.no_grad():
        batched = model(x)
        for level, again in zip(batched, model(x)):
            assert torch.equal(level, again)
        for i in range(3):
            for alone, inside in zip(model(x[i:i + 1]), batched):
                torch.testing.assert_close(alone, inside[i:i + 1], atol=1e-9, rtol=0)


@pytest.mark.parametrize('name', NAMES)
def test_out_indices_select_outputs_and_their_norms(name):
    model = build(name, out_indices=(1, -1))
    assert model.out_indices == (1, 3)
    assert hasattr(model, 'out_norm1') and hasattr(model, 'out_norm3')
    assert not hasattr(model, 'out_norm0') and not hasattr(model, 'out_norm2')
    outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, 1, (64, 96))


def _frozen_names(model) -> set:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize('name', NAMES)
def test_frozen_stages_from_construction_on(name):
    """Frozen parameters never require grad: not after construction (where DDP registers the
    trained parameters), not after init_weights, not in train(); frozen parts stay in eval."""
    model = build(name, frozen_stages=1)
    expected = {n for n, _ in model.named_parameters() if n.startswith(FROZEN_BY_ONE[name])}
    assert expected and _frozen_names(model) == expected
    model.init_weights()
    assert _frozen_names(model) == expected
    model.train()
    assert _frozen_names(model) == expected
    for module_name, module in model.named_modules():
        if module_name and (module_name + '.').startswith(FROZEN_BY_ONE[name]):
            assert not module.training, module_name
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    for param_name, param in model.named_parameters():
        assert (param.grad is None) == (param_name in expected), param_name
    assert not _frozen_names(build(name, frozen_stages=-1))


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, )])
def test_the_largest_frozen_stages_freezes_every_parameter(name, out_indices):
    """As mmdet's Swin at its largest frozen_stages: nothing trains, output norms (and the
    plain ViT's pyramid) included, and every module with parameters stays in eval mode."""
    largest = LARGEST_FROZEN[name]
    with pytest.raises(ValueError, match='frozen_stages'):
        build(name, frozen_stages=largest + 1)
    model = build(name, frozen_stages=largest, out_indices=out_indices)
    model.init_weights()
    model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert [n for n, m in model.named_modules()  # the root holds RefinerViT's embeddings
            if n and m.training and any(True for _ in m.parameters(recurse=False))] == []
    # the stages after the last output are not built: freezing the built ones freezes all
    built = largest if name == 'RefinerViT' else out_indices[-1] + 1
    all_built = build(name, frozen_stages=built, out_indices=out_indices)
    assert not any(p.requires_grad for p in all_built.parameters())
    one_less = build(name, frozen_stages=built - 1, out_indices=out_indices)
    assert any(p.requires_grad for p in one_less.parameters())


def _family_pairs():
    for own in NAMES:
        for other in NAMES:
            if other != own:
                yield pytest.param(own, other, id=f'{other}-into-{own}')


@pytest.mark.parametrize('own,other', list(_family_pairs()))
def test_weights_of_another_family_are_refused(tmp_path, own, other):
    """Whatever share of the tensors would match, a checkpoint whose keys name another family
    never loads: the ValueError of a checkpoint that does not fit."""
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': build(other).state_dict()}, path)
    model = build(own, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf'{re.escape(str(path))}.*does not fit {own}.*'
                       r'weights of another family are never loaded'):
        model.init_weights()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_boat_swin_weights_that_mostly_fit_a_boat_cswin_are_refused(tmp_path):
    """The issue's case: equal widths, most tensors match."""
    arch = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2))
    path = tmp_path / 'swin.pth'
    torch.save({'state_dict': backbones.BOATSwin(arch=arch).state_dict()}, path)
    model = backbones.BOATCSWin(arch=dict(arch, split_sizes=(1, 2, 7, 7)),
                                init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='BOAT-Swin weights, the model is BOAT-CSWin') as err:
        model.init_weights()
    matched, total = map(int, re.search(r'\((\d+) of its (\d+) tensors would match\)',
                                        str(err.value)).groups())
    assert matched >= total / 2  # the below-50 % rule alone would have loaded the mixture


@pytest.mark.parametrize('name', NAMES)
def test_with_cp_gives_the_same_gradients(name):
    x = torch.randn(1, 3, 64, 80)
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build(name, with_cp=with_cp, drop_path_rate=0.2)
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for param_name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][param_name], grad, msg=param_name)


def _bad_arch(name: str, **changes) -> dict:
    return dict(arch=dict(TINY_BACKBONES[name]['arch'], **changes))


_COMMON_BAD = [
    (dict(frozen_stages=1.5), 'frozen_stages'), (dict(frozen_stages='1'), 'frozen_stages'),
    (dict(frozen_stages=True), 'frozen_stages'), (dict(frozen_stages=-2), 'frozen_stages'),
    (dict(out_indices=()), 'out_indices'), (dict(out_indices=True), 'out_indices'),
    (dict(out_indices=(4, )), 'out_indices'), (dict(out_indices=(0, 0)), 'out_indices'),
    (dict(in_channels=-1), 'in_channels'), (dict(in_channels=True), 'in_channels'),
    (dict(drop_path_rate=1.0), 'drop_path_rate'), (dict(drop_path_rate=-0.1), 'drop_path_rate'),
    (dict(arch='huge'), 'arch'),
]
_SPECIFIC_BAD = {
    'BOATSwin': [(dict(window_size=True), 'window_size'), (dict(window_size=1), 'window_size'),
                 (dict(mlp_ratio=0.), 'mlp_ratio'), (dict(drop_rate=2.0), 'drop_rate'),
                 (dict(attn_drop_rate=1.0), 'attn_drop_rate'),
                 (dict(fsla_group_size=2.5), 'fsla_group_size'),
                 (dict(fsla_overlap=-1), 'fsla_overlap'),
                 (dict(fsla_qk_scale=0.), 'fsla_qk_scale')],
    'BOATCSWin': [(dict(mlp_ratio=-1.), 'mlp_ratio'), (dict(mlp_ratio=float('inf')), 'mlp_ratio'),
                  (dict(drop_rate=2.0), 'drop_rate'),
                  (dict(fsla_group_size=2.5), 'fsla_group_size'),
                  (dict(fsla_overlap=50), 'fsla_overlap'),
                  (dict(last_stage_attn='full'), 'last_stage_attn')],
    'MAFormer': [(dict(window_size=True), 'window_size'), (dict(mlp_ratio=0.), 'mlp_ratio'),
                 (dict(drop_rate=2.0), 'drop_rate'), (dict(gld_ratio=0.), 'gld_ratio'),
                 (dict(fusion='both'), 'fusion'),
                 (dict(gld_resize_mode='nearest'), 'gld_resize_mode')],
    'RefinerViT': [(dict(window_size=True), 'window_size'),
                   (dict(pretrain_img_size=100), 'pretrain_img_size'),
                   (dict(dla_kernel_size=0), 'dla_kernel_size'),
                   (dict(global_attn_indexes=(2, )), 'global_attn_indexes')],
}


def _bad_cases():
    for name in NAMES:
        arch = TINY_BACKBONES[name]['arch']
        cases = list(_COMMON_BAD) + _SPECIFIC_BAD[name]
        cases.append((_bad_arch(name, embed_dims=True), 'embed_dims'))
        cases.append((_bad_arch(name, embed_dims=0), 'embed_dims'))
        if 'depths' in arch:
            cases.append((_bad_arch(name, depths=True), 'depths'))
            cases.append((_bad_arch(name, depths=(1, 1, True, 1)), 'depths'))
            cases.append((_bad_arch(name, num_heads=(3, 2, 2, 2)), 'num_heads'))
        else:
            cases.append((_bad_arch(name, num_layers=True), 'num_layers'))
            cases.append((_bad_arch(name, mlp_ratio=0.), 'mlp_ratio'))
            cases.append((_bad_arch(name, num_heads=5), 'num_heads'))
        for kwargs, match in cases:
            yield pytest.param(name, kwargs, match, id=f'{name}-{match}-{kwargs}')


@pytest.mark.parametrize('name,kwargs,match', list(_bad_cases()))
def test_bad_arguments_raise_a_value_error_naming_them(name, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build(name, **kwargs)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('x,error,match', [
    (torch.randn(3, 32, 32), ValueError, '4-D'),
    (torch.randn(1, 1, 32, 32), ValueError, 'in_channels'),
    (torch.randn(1, 3, 0, 32), ValueError, 'empty'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, 'torch.uint8'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.float16), TypeError, 'torch.float16'),
    ([torch.zeros(3, 32, 32)], ValueError, '4-D'),
])
def test_bad_input_gives_a_clear_error(name, x, error, match):
    with pytest.raises(error, match=match):
        build(name)(x)


@pytest.mark.parametrize('name', NAMES)
def test_checkpoint_report_names_unmatched_keys(tmp_path, name):
    source = build(name)
    state = dict(source.state_dict())
    keys = [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 1]
    missing, mismatched = keys[1], keys[-1]
    del state[missing]
    state[mismatched] = torch.zeros(3, 3, 3)
    state['extra.weight'] = torch.zeros(2)
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in state.items()}}, path)

    model = build(name, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    report = model.load_report
    assert report.missing == ([] if 'out_norm' in missing else [missing])
    assert report.unexpected == ['extra.weight']
    assert [m.split(':')[0] for m in report.mismatched] == [mismatched]
    loaded = model.state_dict()
    for key in keys[2:-1]:
        torch.testing.assert_close(loaded[key], source.state_dict()[key], msg=key)
