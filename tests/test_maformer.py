"""MAFormer: backbone API, the resolution-agnostic GLD, the paper's ablation switches, and builds
inside mmdet's Mask R-CNN and mmseg's UperNet. Tiny widths everywhere; full-size presets are
only built (parameter counts), never run."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope

from mmvit_plugins.models.backbones.maformer import GLD, LocalWindowAttention, MAFBlock, MAFormer
from mmvit_plugins.models.layers import window, window_attention_mask

TINY = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny(**kwargs) -> MAFormer:
    kwargs = {'arch': TINY, 'pretrain_img_size': 64, 'drop_path_rate': 0., **kwargs}
    return MAFormer(**kwargs)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- registration and presets -------------------------------------------------------------------


# Parameter counts of the presets at pretrain_img_size=224, the numbers in
# docs/backbones/maformer.md. Most of the difference to CSWin is the GLD token FC: one
# Linear(3136, 1568) (4.92M parameters) per stage-1 block, one Linear(784, 392) per stage-2 block.
PRESETS = {
    'tiny': ((96, 192, 384, 768), 38_776_018),
    'small': ((64, 128, 256, 512), 26_766_154),
    'base': ((64, 128, 256, 512), 44_937_812),
    'large': ((96, 192, 384, 768), 86_867_944),
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_presets(name):
    widths, params = PRESETS[name]
    with torch.device('meta'):  # full size: count, never run
        model = MAFormer(arch=name)
        alias = MAFormer(arch=name[0].upper())  # short, case-insensitive name
    assert tuple(model.num_features) == widths
    assert num_params(model) == num_params(alias) == params


def test_gld_layer_has_the_papers_size_at_224():
    model = MAFormer(arch=TINY, pretrain_img_size=224)
    fc1 = model.stages[0].blocks[0].gld.token_fc
    fc2 = model.stages[1].blocks[0].gld.token_fc
    assert tuple(fc1.weight.shape) == (56 * 56 // 2, 56 * 56)
    assert tuple(fc2.weight.shape) == (28 * 28 // 2, 28 * 28)


# -- forward / backward -------------------------------------------------------------------------


# -- GLD ----------------------------------------------------------------------------------------
def test_gld_is_the_papers_token_fc_at_the_pretraining_grid():
    gld = GLD(dim=8, grid_size=(6, 5), ratio=0.5)
    x = torch.randn(2, 6, 5, 8)
    tokens = x.reshape(2, 30, 8)  # (B, L, C), row-major like the flattened feature map
    expected = torch.einsum('blc,ml->bmc', tokens, gld.token_fc.weight)
    expected = expected + gld.token_fc.bias[:, None] + gld.pos_embed
    assert gld.num_global_tokens == 15
    torch.testing.assert_close(gld(x), expected)


@pytest.mark.parametrize('mode', ['bilinear', 'area'])
@pytest.mark.parametrize('size', [(8, 8), (5, 12), (3, 3), (1, 2), (20, 31), (31, 20)])
def test_gld_any_size(mode, size):
    gld = GLD(dim=4, grid_size=(8, 8), ratio=0.5, resize_mode=mode)
    params = num_params(gld)
    x = torch.randn(2, *size, 4, requires_grad=True)
    out = gld(x)
    assert out.shape == (2, 32, 4)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(gld.token_fc.weight.grad).all()
    assert num_params(gld) == params


def test_gld_area_mode_averages_onto_the_grid():
    gld = GLD(dim=4, grid_size=(4, 4), ratio=0.5, resize_mode='area')
    x = torch.randn(1, 8, 12, 4)
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), (2, 3)).permute(0, 2, 3, 1)
    torch.testing.assert_close(gld(x), gld(pooled))


GLD_SIZES = [(8, 8), (5, 12), (3, 3), (1, 2), (20, 31), (31, 20), (64, 7), (17, 16)]


def _torch_resample(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """torch's own kernels: antialiased bilinear interpolation or adaptive average pooling."""
    if mode == 'area':
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size, mode='bilinear', align_corners=False, antialias=True)


@pytest.mark.parametrize('mode', ['bilinear', 'area'])
def test_gld_resampling_equals_torchs_kernels_in_float64(mode):
    """Shrinking, enlarging and mixed sizes onto 8x8 and 6x5 grids: GLD's resampling (matrix
    products that export to ONNX) is torch's interpolation or pooling to float64 rounding."""
    for grid in ((8, 8), (6, 5)):
        gld = GLD(dim=3, grid_size=grid, ratio=0.5, resize_mode=mode).double()
        for size in GLD_SIZES:
            x = torch.randn(2, 3, *size, dtype=torch.float64)
            expected = _torch_resample(x, grid, mode)
            resampled = gld.resample(x)
            assert resampled.dtype == torch.float64
            torch.testing.assert_close(resampled, expected, rtol=0, atol=1e-12,
                                       msg=f'{size} -> {grid}')
            tokens = x.permute(0, 2, 3, 1)
            fc = F.linear(expected.flatten(2), gld.token_fc.weight, gld.token_fc.bias)
            torch.testing.assert_close(gld(tokens), fc.transpose(1, 2) + gld.pos_embed,
                                       rtol=0, atol=1e-12, msg=f'{size} -> {grid}')


def test_gld_ratio_sets_the_number_of_global_tokens():
    model = tiny(gld_ratio=0.25)
    assert model.stages[0].blocks[0].gld.num_global_tokens == 16 * 16 // 4
    assert model.stages[1].blocks[0].gld.num_global_tokens == 8 * 8 // 4


# -- MAF block ------------------------------------------------------------------------------------
@pytest.mark.parametrize('fusion', ['parallel', 'sequential'])
def test_fusion_variant_decides_what_gld_reads(fusion):
    block = MAFBlock(dim=8, num_heads=2, window_size=4, grid_size=(8, 8), fusion=fusion)
    seen = {}
    block.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__('input', o))
    block.local_attn.register_forward_hook(lambda m, i, o: seen.__setitem__('local', o))
    block.gld.register_forward_pre_hook(lambda m, i: seen.__setitem__('gld', i[0]))
    block.fusion_attn.register_forward_pre_hook(lambda m, i: seen.__setitem__('query', i[0]))
    out = block(torch.randn(2, 10, 6, 8))
    assert out.shape == (2, 10, 6, 8)
    expected = seen['local'] if fusion == 'sequential' else seen['input']
    torch.testing.assert_close(seen['gld'], expected)
    torch.testing.assert_close(seen['query'], seen['local'].reshape(2, 60, 8))


def test_window_padding_never_leaks(monkeypatch):
    attn = LocalWindowAttention(dim=8, num_heads=2, window_size=4)
    x = torch.randn(2, 6, 9, 8)
    mask = window_attention_mask((6, 9), 4, 0, x.device)
    reference = attn(x, mask)
    monkeypatch.setattr(window, 'pad_to_multiple',
                        lambda t, m: F.pad(t, (0, 0, 0, -t.shape[2] % m, 0, -t.shape[1] % m),
                                           value=7.))
    torch.testing.assert_close(attn(x, mask), reference)


def test_drop_path_rises_linearly_over_blocks():
    model = tiny(drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.
             for stage in model.stages for b in stage.blocks]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3])


def test_pretrained_loading_reports_unmatched_keys_by_name(tmp_path):
    source = tiny()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith('out_norm')}
    del state['stages.0.blocks.0.gld.pos_embed']
    state['head.weight'] = torch.zeros(10, 128)
    path = tmp_path / 'maformer.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in state.items()}}, path)

    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    report = model.load_report
    assert report.missing == ['stages.0.blocks.0.gld.pos_embed']
    assert report.unexpected == ['head.weight'] and report.mismatched == []
    torch.testing.assert_close(model.stages[2].blocks[0].attn.q.weight,
                               source.stages[2].blocks[0].attn.q.weight)

    # GLD layers built for another pretraining size do not fit, and are named.
    other = tiny(pretrain_img_size=32, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    other.init_weights()
    mismatched = [m.split(':')[0] for m in other.load_report.mismatched]
    assert sorted(mismatched) == ['stages.0.blocks.0.gld.token_fc.bias',
                                  'stages.0.blocks.0.gld.token_fc.weight',
                                  'stages.1.blocks.0.gld.pos_embed',
                                  'stages.1.blocks.0.gld.token_fc.bias',
                                  'stages.1.blocks.0.gld.token_fc.weight']


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1))), 'num_heads'),
    (dict(arch=dict(embed_dims=16, depths=(1, 1, 1), num_heads=(1, 2, 2, 4))), 'depths'),
    (dict(gld_ratio=1.5), 'gld_ratio'),
    (dict(window_size=0), 'window_size'),
    (dict(pretrain_img_size=(0, 64)), 'pretrain_img_size'),
    (dict(pretrain_img_size=(64, 64, 64)), 'pretrain_img_size'),
    (dict(pretrain_img_size=True), 'pretrain_img_size'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


# -- inside detectors and segmentors ------------------------------------------------------------
def _tiny_config(name: str):
    """A project config (configs/<name>) with its MAFormer backbone shrunk to tiny widths."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / 'configs' / name))
    cfg.model.backbone.update(arch=TINY, pretrain_img_size=64)
    return cfg


def test_builds_and_trains_in_mmdet_mask_rcnn():
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = _tiny_config('mask_rcnn_maformer_t_fpn_1x_coco.py')
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    packed = demo_mm_inputs(1, [[3, 224, 224]], num_items=[2], with_mask=True)
    total, _ = model.parse_losses(model(**model.data_preprocessor(packed, True), mode='loss'))
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.stages[0].blocks[0].gld.token_fc.weight.grad is not None


def test_builds_and_trains_in_mmseg_upernet():
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = _tiny_config('upernet_maformer_t_ade20k.py')
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=32)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(224, 224), pad_shape=(224, 224)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 224, 224)))
        samples.append(sample)
    total, _ = model.parse_losses(model.loss(torch.randn(2, 3, 224, 224), samples))
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.stages[1].blocks[0].gld.token_fc.weight.grad is not None
