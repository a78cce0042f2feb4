"""The timm models: registration and pretrained configs, the timm model contract over every
registered name at tiny width, pretrained loading from files written here (never the network),
``features_only`` equal to the mm backbones, and logits parity with the public code.

Parity references:

- BOAT-Swin and BOAT-CSWin: ``tests/data/boat_{swin,cswin}_public_logits.json`` hold the logits
  (and pooled features) of the public models of github.com/mahaoyuHKU/pytorch-boat (commit
  ``source.commit`` in each file; constructor call in ``source.constructor``, e.g.
  ``SwinTransformer(img_size=224, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2],
  window_size=7, num_classes=10, drop_path_rate=0.0)``), run once on CPU in float64 in eval mode
  with the only change ``torch.arange(N).cuda()`` -> ``torch.arange(N, device=x.device)``. Their
  weights were :func:`public_weights` of the file's ``parameters`` (names and shapes of the public
  model's parameters, in its order) loaded into the public model, which kept its own buffers; the
  input was ``torch.randn(input_shape)`` from a generator seeded with ``input_seed``. The files
  hold only names, shapes and outputs; this test regenerates the weights and the input and loads
  them into the timm model through its checkpoint filter.
  The public BOAT-CSWin's stage-4 FSLA (one 49-token group at 224) pairs images of a batch and
  fails for a batch of one; that defect is not reproduced, so the 224 reference zeroes the output
  projection of the stage-4 FSLA (``zeroed``): the branch adds zero in both models.
  ``boat_cswin_448_public_logits.json`` holds the same tiny model built for 448x448 inputs
  (``img_size=448``), nothing zeroed: its stage 4 has 14x14 tokens in four groups, where the
  public FSLA pairs the groups of one image, so every branch of every stage is compared.
- Refiner-ViT: the independent literal reimplementation of the public forward of
  ``tests/test_refiner_vit.py`` (public-key random weights), with the public inference heads.
"""
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mmvit_plugins  # noqa: F401  (registers the timm models)
from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin, MAFormer, RefinerViT
from mmvit_plugins.models.timm_models import checkpoint_filter_fn
from tests.conftest import TINY_BACKBONES
from tests.test_refiner_vit import TINY_ARCH as REFINER_ARCH
from tests.test_refiner_vit import public_state_dict, reference_tokens

DATA = Path(__file__).parent / 'data'
FAMILIES = {
    'boat_swin': (BOATSwin, ('tiny', 'small', 'base')),
    'boat_cswin': (BOATCSWin, ('tiny', 'small', 'base')),
    'refiner_vit': (RefinerViT, ('s', 'm', 'l')),
    'maformer': (MAFormer, ('tiny', 's', 'b', 'l')),
}
NAMES = [f'{family}_{size}' for family, (_, sizes) in FAMILIES.items() for size in sizes]
PUBLIC_FILES = {'boat_swin_tiny': 'tiny.pth', 'boat_swin_small': 'small.pth',
                'boat_swin_base': 'base.pth', 'boat_cswin_tiny': 'cswin_tiny.pth.tar',
                'boat_cswin_small': 'cswin_small.pth.tar', 'boat_cswin_base': 'cswin_base.pth.tar'}
# Public models without classifier head and final norm (design docs: counted from the code).
PUBLIC_TRUNK_PARAMS = {
    'boat_swin_tiny': 29_494_650, 'boat_swin_small': 54_388_362, 'boat_swin_base': 96_585_912,
    'boat_cswin_tiny': 25_876_928, 'boat_cswin_small': 39_598_464,
    'boat_cswin_base': 88_858_176, 'refiner_vit_s': 24_637_888, 'refiner_vit_m': 54_608_092,
    'refiner_vit_l': 80_123_168,
}
SIZE = (61, 93)  # odd, non-square
NUM_CLASSES = 10


def _family(name: str) -> str:
    return name.rsplit('_', 1)[0]


@lru_cache
def _reference(family: str) -> dict:
    with open(DATA / f'{family}_public_logits.json') as f:
        return json.load(f)


def _tiny_kwargs(name: str) -> dict:
    """Tiny widths of every family (the BOAT ones are the parity references')."""
    family = _family(name)
    if family.startswith('boat'):
        kwargs = dict(_reference(family)['model_kwargs'])
        kwargs.pop('num_classes')
        return kwargs
    if family == 'refiner_vit':
        return dict(arch=REFINER_ARCH)
    return dict(TINY_BACKBONES['MAFormer'])


def _mm_kwargs(name: str) -> dict:
    """The mm backbone's arguments that the timm model passes on."""
    kwargs = _tiny_kwargs(name)
    if _family(name) == 'refiner_vit':
        kwargs.update(with_cls_token=True, global_attn_indexes='all')
    return kwargs


def _create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **{**_tiny_kwargs(name), **kwargs})


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Every download path of timm's builder fails the test."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError(f'timm tried to download: {args}')

    for fn in ('load_state_dict_from_url', 'load_state_dict_from_hf', 'download_cached_file',
               'load_custom_from_hf'):
        if hasattr(builder, fn):
            monkeypatch.setattr(builder, fn, refuse)


@pytest.fixture
def float64():
    """Models built in float64, so that float64 checkpoints load without rounding."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


# -- checkpoints in the public layouts -------------------------------------------------------
def public_weights(spec: dict) -> Dict[str, torch.Tensor]:
    """float64 tensors under the public names: every ``spec['parameters']`` entry in order from
    a generator seeded with ``spec['seed']`` (norm weights 1 + N(0, 0.2), biases N(0, 0.1),
    relative position bias tables N(0, 0.5), other weights N(0, 1 / fan_in)); the entries of
    ``spec['zeroed']`` are zero."""
    g = torch.Generator().manual_seed(spec['seed'])
    out = {}
    for key, shape in spec['parameters']:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if key in spec['zeroed']:
            t = torch.zeros_like(t)
        elif key.endswith('.bias'):
            t = 0.1 * t
        elif len(shape) == 1:
            t = 1 + 0.2 * t
        elif key.endswith('relative_position_bias_table'):
            t = 0.5 * t
        else:
            t = t * math.prod(shape[1:])**-0.5
        out[key] = t
    return out


def _public_checkpoint(name: str, reference: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The public model's state dict layout, random tensors (tiny widths, 10 classes); BOAT:
    those of the parity reference file ``reference`` (default: the family's at 224)."""
    family = _family(name)
    if family.startswith('boat'):
        spec = _reference(reference or family)
        state = public_weights(spec)
        # buffers: the converter takes the relative position index from the model and drops
        # Swin's shift masks, so their values do not matter
        for key, shape, dtype in spec['buffers']:
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
        return state
    if family == 'refiner_vit':
        return public_state_dict(REFINER_ARCH['embed_dims'], REFINER_ARCH['num_layers'],
                                 REFINER_ARCH['num_heads'], REFINER_ARCH['mlp_ratio'])
    # MAFormer has no public code: a trained mm backbone (mmengine layout) plus a head
    backbone = MAFormer(**_mm_kwargs(name), out_indices=(3, ))
    for p in backbone.parameters():
        nn.init.normal_(p)
    width = backbone.num_features[-1]
    return {**{f'backbone.{k}': v for k, v in backbone.state_dict().items()},
            'head.weight': torch.randn(NUM_CLASSES, width), 'head.bias': torch.randn(NUM_CLASSES)}


def _write(name: str, path: Path, reference: Optional[str] = None) -> Dict[str, torch.Tensor]:
    state = _public_checkpoint(name, reference)
    container = 'state_dict' if str(path).endswith('.tar') else 'model'
    torch.save({container: state, 'epoch': 300}, path)
    return state


def _head_tensors(name: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Expected classifier tensors of the timm model from a public state dict."""
    if _family(name) == 'refiner_vit':
        return {k: v for k, v in state.items() if k.startswith(('head.', 'aux_head.', 'norm.'))}
    return {'head.fc.weight': state['head.weight'], 'head.fc.bias': state['head.bias']}


# -- registration and pretrained configs -----------------------------------------------------
def test_every_model_is_registered_on_import():
    assert sorted(timm.list_models(['boat_*', 'refiner_vit_*', 'maformer_*'])) == sorted(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_pretrained_cfg_names_the_public_file_and_never_a_download(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    assert not cfg.get('url') and not cfg.get('hf_hub_id') and not cfg.get('hf_hub_filename')
    assert cfg.get('file') == PUBLIC_FILES.get(name)
    assert cfg['num_classes'] == 1000 and cfg['input_size'] == (3, 224, 224)
    assert cfg['interpolation'] == 'bicubic'
    family = _family(name)
    expected = {'boat_swin': (0.875, timm.data.IMAGENET_DEFAULT_MEAN),
                'boat_cswin': (0.9, timm.data.IMAGENET_DEFAULT_MEAN),
                'maformer': (0.9, timm.data.IMAGENET_DEFAULT_MEAN),
                'refiner_vit': ({'s': 0.9, 'm': 1.0, 'l': 1.13}.get(name[-1]), (0.5, ) * 3)}
    crop, mean = expected[family]
    assert cfg['crop_pct'] == crop and tuple(cfg['mean']) == tuple(mean)
    # forward_features at the input size: a stride-32 map, or tokens (no pool size), as timm's
    assert cfg['pool_size'] == (None if family == 'refiner_vit' else (7, 7))
    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    classifiers = (cfg['classifier'], ) if isinstance(cfg['classifier'], str) \
        else cfg['classifier']
    assert all(isinstance(model.get_submodule(c), nn.Linear) for c in classifiers)
    data = timm.data.resolve_data_config({}, model=model)
    assert data['crop_pct'] == crop and data['input_size'] == (3, 224, 224)


@pytest.mark.parametrize('name', NAMES)
def test_full_preset_parameter_counts_on_meta_device(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    params = dict(model.named_parameters())
    head = {k for k in params if k.startswith(('head.', 'aux_head.'))}
    final_norm = {k for k in params if k.startswith(('norm.', 'backbone.out_norm'))}
    assert sum(params[k].numel() for k in head) == \
        (1 + (_family(name) == 'refiner_vit')) * 1000 * (model.num_features + 1)
    trunk = sum(p.numel() for k, p in params.items() if k not in head | final_norm)
    if name in PUBLIC_TRUNK_PARAMS:
        assert trunk == PUBLIC_TRUNK_PARAMS[name]
    else:  # MAFormer: the mm backbone's trunk
        preset = {'tiny': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}[name.split('_')[1]]
        with torch.device('meta'):
            mm = MAFormer(preset)
        assert trunk == sum(p.numel() for k, p in mm.named_parameters()
                            if not k.startswith('out_norm'))


# -- the timm model contract -----------------------------------------------------------------
# timm's tests/test_models.py (test_model_default_cfgs[_non_std], test_model_backward,
# test_model_forward_features, test_model_forward_intermediates[_features]) with their input
# sizes, at tiny widths: the sizes of a family differ only in their configs (checked for all 13
# names above), so the forwards run once per family. Refiner-ViT returns tokens from
# forward_features, as timm's ViTs (NON_STD_FILTERS there); the hierarchical models are standard.
FAMILY_NAMES = [f'{family}_{sizes[0]}' for family, (_, sizes) in FAMILIES.items()]
PYRAMID_NAMES = [n for n in FAMILY_NAMES if _family(n) != 'refiner_vit']
TARGET_BWD_SIZE, TARGET_FFEAT_SIZE = 128, 96


def _input_size(model: nn.Module, target: int) -> tuple:
    return tuple(min(s, target) for s in model.pretrained_cfg['input_size'])


@pytest.mark.parametrize('name', PYRAMID_NAMES)
def test_timm_default_cfgs(name):
    """timm's test_model_default_cfgs: pool_size is the unpooled feature map of the config's
    input size, also without pooling and classifier."""
    model = _create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict, cfg = model.state_dict(), model.pretrained_cfg
    pool_size = cfg['pool_size']
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        outputs = model.forward_features(x)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert tuple(outputs.shape[2:]) == pool_size == (7, 7)
        assert outputs.shape[1] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model(x)
        assert outputs.dim() == 2 and outputs.shape == outputs_pre.shape
        model.reset_classifier(0, '')
        outputs = model(x)
        assert outputs.dim() == 4 and tuple(outputs.shape[2:]) == pool_size
        outputs = _create(name, num_classes=0, global_pool='').eval()(x)
        assert outputs.dim() == 4 and tuple(outputs.shape[2:]) == pool_size
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('name', ['refiner_vit_s'])
def test_timm_default_cfgs_non_std(name):
    """timm's test_model_default_cfgs_non_std (token outputs, as its ViTs)."""
    model = _create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict, cfg = model.state_dict(), model.pretrained_cfg
    assert cfg['pool_size'] is None
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        outputs = model.forward_features(x)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.dim() == 3 and outputs.shape[-1] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model(x)
        assert outputs.shape == outputs_pre.shape == (1, model.head_hidden_size)
        assert _create(name, num_classes=0).eval()(x).shape == (1, model.num_features)
    assert all(c + '.weight' in state_dict for c in cfg['classifier'])
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_timm_backward_reaches_every_parameter(name):
    """timm's test_model_backward: every parameter of the classifier gets a gradient."""
    model = _create(name, num_classes=42, drop_path_rate=0.1)
    num_params = sum(p.numel() for p in model.parameters())
    model.train()
    outputs = model(torch.randn(2, *_input_size(model, TARGET_BWD_SIZE)))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'No gradient for {n}'
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen either


@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_no_weight_decay_names_position_tables_and_tokens(name):
    """docs/timm.md: ``no_weight_decay()`` names the relative position bias tables, the
    position embeddings and the class token; timm's optimizer factory then leaves them
    undecayed although they are not 1-D."""
    from timm.optim import create_optimizer_v2

    model = _create(name)
    family = _family(name)
    if family == 'boat_swin':  # every (shifted) window attention, depths (2, 2, 2, 2)
        expected = {f'backbone.stages.{i}.blocks.{j}.attn.relative_position_bias_table'
                    for i in range(4) for j in range(2)}
    elif family == 'maformer':  # the window attention and GLD of stages 1 and 2 (one block)
        expected = {f'backbone.stages.{i}.blocks.0.{k}' for i in range(2) for k in (
            'gld.pos_embed', 'local_attn.attn.relative_position_bias_table')}
    elif family == 'refiner_vit':
        expected = {'backbone.pos_embed', 'backbone.cls_token'}
    else:  # BOAT-CSWin: LePE, no position table or embedding
        expected = set()
    assert model.no_weight_decay() == expected
    params = dict(model.named_parameters())
    assert all(params[n].dim() > 1 for n in expected)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups
             for p in group['params']}
    assert [n for n in expected if decay[id(params[n])] != 0] == []
    assert decay[id(model.get_classifier().weight)] == 0.05


# What TorchScript's compiler rejects first in each family (docs/timm.md), and where.
TORCHSCRIPT_FAILURES = {
    # the block's Optional[FeatureSpaceLocalAttention] submodule annotation
    'boat_swin': (AssertionError, r'Unsupported annotation typing\.Optional\[.*'
                                  r'FeatureSpaceLocalAttention\]', 'try_ann_to_type'),
    # the same annotations, where the block has the module (an assertion without a message)
    'boat_cswin': (AssertionError, r'^$', 'infer_concrete_type_builder'),
    'refiner_vit': (torch.jit.frontend.NotSupportedError,
                    r'Comprehension ifs are not supported', None),
    # q, k, v = qkv.permute(...)
    'maformer': (RuntimeError, r'Tensor cannot be used as a tuple', None),
}


@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_torchscript_and_fx_symbolic_tracing_fail_as_documented(name):
    """docs/timm.md: no TorchScript (Python its compiler rejects), no FX symbolic tracing (shape
    checks on Proxy objects); the capture paths are torch.compile and ONNX."""
    model = _create(name).eval()
    error, message, where = TORCHSCRIPT_FAILURES[_family(name)]
    with pytest.raises(error, match=message) as info:
        torch.jit.script(model)
    assert where is None or info.traceback[-1].name == where
    with pytest.raises(ValueError, match=r'input must be a 4-D tensor .*got Proxy'):
        torch.fx.symbolic_trace(model)


def _check_levels(feature_info, outputs, size, batch=1) -> None:
    """timm's assertions on feature maps: one per level, its channels, at most
    ceil(size / reduction) + 1 wide and high, no NaN."""
    assert len(feature_info.channels()) == len(outputs)
    for c, r, o in zip(feature_info.channels(), feature_info.reduction(), outputs):
        assert o.shape[:2] == (batch, c)
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_timm_forward_intermediates(name):
    """timm's test_model_forward_intermediates: by default every feature_info level, and the
    final output equals forward_features."""
    model = _create(name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(feature_info.channels()) >= 3
    size = _input_size(model, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        _check_levels(feature_info, intermediates, size[1:])
        assert torch.allclose(output, model.forward_features(x))


@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_timm_forward_features_and_intermediates_features(name):
    """timm's test_model_forward_features and test_model_forward_intermediates_features."""
    for kwargs in (dict(), dict(feature_cls='getter')):
        model = _create(name, features_only=True, **kwargs).eval()
        assert len(model.feature_info.channels()) >= 3
        size = _input_size(model, TARGET_FFEAT_SIZE)
        with torch.no_grad():
            _check_levels(model.feature_info, model(torch.randn(1, *size)), size[1:])


@pytest.mark.parametrize('name', NAMES)
def test_num_classes_0_reset_classifier_and_forward_head(name):
    model = _create(name, num_classes=7).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    assert _create(name, num_classes=0)(x).shape == (2, model.num_features)


@pytest.mark.parametrize('name', NAMES)
def test_features_only_equals_the_mm_backbone(name):
    features = _create(name, features_only=True)
    cls = FAMILIES[_family(name)][0]
    mm = cls(**_mm_kwargs(name), out_indices=(0, 1, 2, 3))
    prefix = 'model.backbone.'
    own = features.state_dict()
    assert all(k.startswith(prefix) for k in own)  # no head, no final norm left
    mm.load_state_dict({k[len(prefix):]: v for k, v in own.items()})
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == list(mm.num_features)
    features.eval(), mm.eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        outs, expected = features(x), mm(x)
    assert [o.shape[2:] for o in outs] == [
        (math.ceil(SIZE[0] / s), math.ceil(SIZE[1] / s)) for s in (4, 8, 16, 32)]
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=0, atol=0)
    subset = _create(name, features_only=True, out_indices=(1, 3))
    assert subset.feature_info.channels() == [mm.num_features[1], mm.num_features[3]]
    assert [o.shape[1] for o in subset(x)] == subset.feature_info.channels()


@pytest.mark.parametrize('name', PYRAMID_NAMES)
def test_forward_intermediates_of_the_stages(name):
    """The four stage outputs; norm=True puts the final norm on the last (timm's rule) in the
    classifier, each stage's out_norm{i} in a model built with out_indices (the mm maps);
    indices, stop_early and intermediates_only as timm's."""
    model = _create(name).eval()
    features = _create(name, out_indices=(0, 1, 2, 3)).eval()
    features.load_state_dict(model.state_dict(), strict=False)  # the same trunk, more norms
    mm = FAMILIES[_family(name)][0](**_mm_kwargs(name), out_indices=(0, 1, 2, 3)).eval()
    mm.load_state_dict({k[len('backbone.'):]: v for k, v in features.state_dict().items()
                        if k.startswith('backbone.')})
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        _, normed = model.forward_intermediates(x, norm=True)
        mm_maps = mm(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(normed[3], final, rtol=0, atol=0)
        for i in range(3):
            torch.testing.assert_close(normed[i], raw[i], rtol=0, atol=0)
            assert not torch.allclose(raw[i], mm_maps[i])  # the mm maps are normed
        torch.testing.assert_close(features.forward_intermediates(x)[1], raw, rtol=0, atol=0)
        for out, exp in zip(features.forward_intermediates(x, norm=True)[1], mm_maps):
            torch.testing.assert_close(out, exp, rtol=0, atol=0)
        for indices, take in ((2, [2, 3]), ((0, -1), [0, 3]), ([1], [1]), (-4, None)):
            if take is None:
                with pytest.raises(ValueError, match=r'indices=-4 is invalid.*allowed values'):
                    model.forward_intermediates(x, indices=indices)
                continue
            for stop_early in (False, True):
                got = model.forward_intermediates(x, indices=indices, stop_early=stop_early,
                                                  intermediates_only=True)
                torch.testing.assert_close(got, [raw[i] for i in take], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"output_fmt='NHWC' is invalid"):
        model.forward_intermediates(x, output_fmt='NHWC')
    with pytest.raises(ValueError, match=r'indices=\(4,\) is invalid'):
        model.forward_intermediates(x, indices=(4, ))


def test_stop_early_runs_only_the_stages_asked_for():
    model = _create('maformer_tiny').eval()
    ran = []
    for i, stage in enumerate(model.backbone.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1, ), stop_early=True,
                                    intermediates_only=True)
        assert ran == [0, 1]
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1, ), stop_early=True)
    assert ran == [0, 1, 0, 1, 2, 3]  # the final features need every stage


def test_forward_intermediates_of_refiner_blocks():
    """Refiner-ViT's classifier: one level per block as timm's ViT (stride 16, patch tokens as
    maps, the class token on request, norm=True through the final norm)."""
    model = _create('refiner_vit_s').eval()
    blocks = REFINER_ARCH['num_layers']
    assert [(i['num_chs'], i['reduction']) for i in model.feature_info] == \
        [(REFINER_ARCH['embed_dims'], 16)] * blocks
    x = torch.randn(2, 3, *SIZE)
    h, w = math.ceil(SIZE[0] / 16), math.ceil(SIZE[1] / 16)
    with torch.no_grad():
        tokens, _ = model.backbone.forward_tokens(x, tuple(range(blocks)))
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(final, model.norm(tokens[-1]), rtol=0, atol=0)
        for t, m in zip(tokens, maps):
            torch.testing.assert_close(
                m, t[:, 1:].reshape(2, h, w, -1).permute(0, 3, 1, 2), rtol=0, atol=0)
        pairs = model.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True,
                                            output_fmt='NLC', intermediates_only=True)
        (nlc, prefix), = pairs
        torch.testing.assert_close(nlc, model.norm(tokens[-1])[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(prefix, final[:, :1], rtol=0, atol=0)
        early = model.forward_intermediates(x, indices=(0, ), stop_early=True,
                                            intermediates_only=True)
        torch.testing.assert_close(early, maps[:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"output_fmt='NHWC' is invalid"):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_forward_intermediates_of_the_refiner_pyramid():
    """A Refiner-ViT built with out_indices (features_only) has the pyramid levels; norm=False
    gives them before out_norm{i}; levels not built are refused by name."""
    model = _create('refiner_vit_s', out_indices=(0, 1, 2, 3)).eval()
    assert [i['reduction'] for i in model.feature_info] == [4, 8, 16, 32]
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        final, normed = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, model.forward_features(x))
        for out, exp in zip(normed, model.backbone(x)):
            torch.testing.assert_close(out, exp, rtol=0, atol=0)
        raw = model.forward_intermediates(x, intermediates_only=True)
        for i, (out, exp) in enumerate(zip(raw, normed)):
            torch.testing.assert_close(getattr(model.backbone, f'out_norm{i}')(out), exp)
    subset = _create('refiner_vit_s', out_indices=(1, 3))
    with pytest.raises(ValueError, match=r'pyramid levels \[0, 2\] are not built'):
        subset.forward_intermediates(x)
    with pytest.raises(ValueError, match='return_prefix_tokens'):
        model.forward_intermediates(x, return_prefix_tokens=True)


@pytest.mark.parametrize('name', ['boat_swin_tiny', 'refiner_vit_s'])
def test_features_only_without_norms(name):
    """feature_cfg=dict(norm=False): timm's FeatureGetterNet asks for the maps before their
    norms and prunes the norms."""
    normed = _create(name, features_only=True).eval()
    raw = _create(name, features_only=True, feature_cfg=dict(norm=False)).eval()
    assert not any('.out_norm' in k for k in raw.state_dict())
    raw.load_state_dict(normed.state_dict(), strict=False)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        for i, (out, exp) in enumerate(zip(raw(x), normed(x))):
            norm = getattr(normed.model.backbone, f'out_norm{i}')
            if _family(name) == 'refiner_vit':
                torch.testing.assert_close(norm(out), exp)
            else:
                torch.testing.assert_close(norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), exp)


@pytest.mark.parametrize('name', NAMES)
def test_loads_the_public_checkpoint_file_like_the_mm_backbone(tmp_path, name):
    """pretrained=True with pretrained_cfg_overlay=dict(file=...): the backbone gets what the mm
    backbone's own loader makes of the same file, the heads the public head tensors."""
    path = tmp_path / (PUBLIC_FILES.get(name) or 'maformer.pth')
    state = _write(name, path)
    model = _create(name, pretrained=True, num_classes=NUM_CLASSES,
                    pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    mm_cls = FAMILIES[_family(name)][0]
    mm = mm_cls(**_mm_kwargs(name), out_indices=model.stage_indices,
                init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    mm.init_weights()
    own = model.state_dict()
    # the Refiner-ViT classifier has no pyramid norm (its out_norm2 is an Identity)
    expected = {**{f'backbone.{k}': v for k, v in mm.state_dict().items()
                   if not (_family(name) == 'refiner_vit' and k.startswith('out_norm'))},
                **_head_tensors(name, state)}
    assert sorted(own) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(own[key], value.float() if value.is_floating_point()
                                   else value, rtol=0, atol=0, msg=key)
    features = _create(name, pretrained=True, features_only=True,
                       pretrained_cfg_overlay=dict(file=str(path)))
    mm = mm_cls(**_mm_kwargs(name), init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    mm.init_weights()
    # Refiner-ViT's pyramid is in no public checkpoint: random init in both, made equal here
    mm.load_state_dict({k[len('model.backbone.'):]: v for k, v in features.state_dict().items()
                        if k.startswith('model.backbone.pyramid.')}, strict=False)
    features.eval(), mm.eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        for out, exp in zip(features(x), mm(x)):
            torch.testing.assert_close(out, exp, rtol=0, atol=0)


@pytest.mark.parametrize('name', ['boat_swin_tiny', 'boat_cswin_base'])
def test_pretrained_true_reads_the_published_file_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        _create(name, pretrained=True, num_classes=NUM_CLASSES)
    state = _write(name, tmp_path / PUBLIC_FILES[name])
    model = _create(name, pretrained=True, num_classes=NUM_CLASSES,
                    pretrained_cfg_overlay=dict(num_classes=NUM_CLASSES))
    torch.testing.assert_close(model.get_classifier().weight, state['head.weight'].float())


@pytest.mark.parametrize('name', ['refiner_vit_s', 'maformer_tiny'])
def test_pretrained_true_without_a_file_refuses(name):
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        _create(name, pretrained=True)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_other_class_count_and_input_channels_adapt_the_public_checkpoint(tmp_path, family):
    name = f'{family}_{FAMILIES[family][1][0]}'
    path = tmp_path / 'public.pth'
    state = _write(name, path)
    model = _create(name, pretrained=True, num_classes=3, in_chans=1,
                    pretrained_cfg_overlay=dict(file=str(path)))
    conv = model.get_submodule(model.pretrained_cfg['first_conv'])
    public_conv = 'patch_embed.conv1' if family == 'refiner_vit' else {
        'boat_swin': 'patch_embed.proj', 'boat_cswin': 'stage1_conv_embed.0',
        'maformer': 'backbone.patch_embed.proj'}[family]
    torch.testing.assert_close(conv.weight, state[f'{public_conv}.weight'].float().sum(
        1, keepdim=True))  # timm's in_chans=1 adaptation of the first conv
    assert model(torch.randn(1, 1, *SIZE)).shape == (1, 3)


@pytest.mark.parametrize('name', NAMES)
def test_keyword_arguments_reach_the_backbone(name):
    model = _create(name, drop_path_rate=0.3, with_cp=True)
    rates = [m.drop_prob for m in model.modules() if hasattr(m, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.3)
    assert model.backbone.num_features == FAMILIES[_family(name)][0](
        **_mm_kwargs(name)).num_features
    with pytest.raises(TypeError, match='no_such_option'):
        _create(name, no_such_option=1)


def test_window_size_and_last_stage_options_reach_the_backbone():
    swin = _create('boat_swin_tiny', window_size=4, fsla_overlap=4)
    tables = [p for k, p in swin.named_parameters() if k.endswith('relative_position_bias_table')]
    assert tables and all(t.shape[0] == (2 * 4 - 1)**2 for t in tables)
    cswin = _create('boat_cswin_tiny', last_stage_attn='window').eval()
    default = _create('boat_cswin_tiny').eval()
    default.load_state_dict(cswin.state_dict())
    x = torch.randn(1, 3, 320, 320)  # a 10x10 last stage: windows of 7 differ from global
    with torch.no_grad():
        assert not torch.allclose(cswin(x), default(x))


def test_features_of_the_full_cswin_tiny_at_any_size():
    """The issue's example: four maps of the full preset at 200x328."""
    model = timm.create_model('boat_cswin_tiny', features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 200, 328))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 50, 82), (1, 128, 25, 41),
                                              (1, 256, 13, 21), (1, 512, 7, 11)]


def test_refiner_windowed_features_and_pooling_options():
    features = _create('refiner_vit_s', features_only=True, with_cls_token=False,
                       global_attn_indexes=(2, 3), window_size=4)
    assert [o.shape[1:] for o in features(torch.randn(1, 3, 100, 150))] == [
        (48, 25, 38), (48, 13, 19), (48, 7, 10), (48, 4, 5)]
    avg = _create('refiner_vit_s', with_cls_token=False, global_attn_indexes=(2, 3),
                  window_size=4, num_classes=4)
    assert avg.global_pool == 'avg' and avg(torch.randn(1, 3, *SIZE)).shape == (1, 4)
    with pytest.raises(ValueError, match="global_pool='token' needs with_cls_token"):
        _create('refiner_vit_s', with_cls_token=False, global_attn_indexes=(2, 3),
                global_pool='token')
    with pytest.raises(ValueError, match=r"global_pool='max' is invalid.*'token', 'avg'"):
        _create('refiner_vit_s', global_pool='max')
    with pytest.raises(ValueError, match='pyramid_block_indexes'):
        _create('refiner_vit_s', pyramid_block_indexes=(0, 0, 1, 1))


def test_feature_extractors_other_than_the_getter_are_refused():
    with pytest.raises(ValueError, match="feature_cls='hook'.*allowed values"):
        _create('boat_swin_tiny', features_only=True, feature_cls='hook')
    with pytest.raises(ValueError, match='out_indices'):
        _create('boat_swin_tiny', features_only=True, out_indices=(4, ))


def test_filter_is_idempotent_on_own_and_converted_checkpoints():
    model = _create('boat_swin_tiny', num_classes=NUM_CLASSES)
    public = _public_checkpoint('boat_swin_tiny')
    once = checkpoint_filter_fn(public, model)
    assert once.keys() == model.state_dict().keys()
    twice = checkpoint_filter_fn(once, model)
    converted = {k[len('backbone.'):]: v for k, v in once.items() if k.startswith('backbone.')}
    converted = checkpoint_filter_fn({**converted, 'head.fc.weight': once['head.fc.weight'],
                                      'head.fc.bias': once['head.fc.bias']}, model)
    for other in (twice, converted):
        assert other.keys() == once.keys()
        assert all(torch.equal(other[k], once[k]) for k in once)


def test_filter_refuses_the_weights_of_another_family():
    model = _create('boat_cswin_tiny', num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r'holds BOAT-Swin weights .*the model is BOAT-CSWin: '
                       'weights of another family are never loaded'):
        checkpoint_filter_fn(_public_checkpoint('boat_swin_tiny'), model)


def test_filter_never_fills_the_final_norm():
    model = _create('boat_swin_tiny', num_classes=NUM_CLASSES)
    public = _public_checkpoint('boat_swin_tiny')
    del public['norm.weight']
    with pytest.raises(RuntimeError, match=re.escape('backbone.out_norm3.weight')):
        model.load_state_dict(checkpoint_filter_fn(public, model))


# -- logits parity with the public code at 224 (BOAT-CSWin also at 448) ----------------------
@pytest.mark.parametrize('reference', ['boat_swin', 'boat_cswin', 'boat_cswin_448'])
def test_boat_logits_equal_the_public_code(tmp_path, float64, reference):
    ref = _reference(reference)
    name = f'{ref["model"]}_tiny'
    path = tmp_path / PUBLIC_FILES[name]
    _write(name, path, reference)
    overlay = dict(file=str(path), num_classes=ref['model_kwargs']['num_classes'])
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              **ref['model_kwargs']).eval()
    x = torch.randn(ref['input_shape'], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(ref['input_seed']))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    expected = torch.tensor(ref['logits'], dtype=torch.float64)
    assert expected.std() > 0.1  # the weights make the logits differ substantially
    torch.testing.assert_close(pooled, torch.tensor(ref['pre_logits'], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def reference_logits(sd: Dict[str, torch.Tensor], img: torch.Tensor,
                     return_dense: bool) -> torch.Tensor:
    """The public Refiner_ViT inference heads: ``head(norm(x)[:, 0])``, plus
    ``0.5 * aux_head(norm(x)[:, 1:]).max(1)`` when ``return_dense``."""
    x = reference_tokens(sd, img, REFINER_ARCH['num_layers'], REFINER_ARCH['num_heads'])
    x = F.layer_norm(x, x.shape[-1:], sd['norm.weight'], sd['norm.bias'], 1e-6)
    logits = F.linear(x[:, 0], sd['head.weight'], sd['head.bias'])
    if return_dense:
        logits = logits + 0.5 * F.linear(x[:, 1:], sd['aux_head.weight'],
                                         sd['aux_head.bias']).max(1)[0]
    return logits


@pytest.mark.parametrize('return_dense', [True, False])
def test_refiner_logits_equal_the_independent_reference(tmp_path, float64, return_dense):
    sd = _public_checkpoint('refiner_vit_s')
    if not return_dense:  # the public models trained without token labelling
        sd = {k: v for k, v in sd.items() if not k.startswith('aux_head.')}
    path = tmp_path / 'refiner.pth.tar'
    torch.save({'state_dict': sd}, path)
    model = _create('refiner_vit_s', pretrained=True, num_classes=NUM_CLASSES,
                    return_dense=return_dense,
                    pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES)).eval()
    img = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        logits = model(img)
        expected = reference_logits(sd, img, return_dense)
    assert expected.std() > 0.1
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
