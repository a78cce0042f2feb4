"""RefinerViT: parity with an independent implementation of the spec, dense-prediction behaviour
(windows, padding, batch independence, pyramid), checkpoint conversion, freezing, bad input."""
import copy
import math
import os.path as osp
from typing import Callable, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmvit_plugins.checkpoint import load_state_dict_report
from mmvit_plugins.models.backbones import RefinerViT
from mmvit_plugins.models.layers.refiner import (
    DEFAULT_CHUNK_POLICY,
    ChunkPolicy,
    DistributedLocalAttention,
    Tiling,
    padded_window_layout,
    refiner_impl_on,
)

TINY_ARCH = dict(embed_dims=48, num_layers=4, num_heads=4, mlp_ratio=2.)
TINY = dict(arch=TINY_ARCH, window_size=4, global_attn_indexes=(2, 3))


# -- an independent, literal implementation of the spec on public checkpoint keys -------------
def public_state_dict(embed: int, depth: int, heads: int, mlp_ratio: float, grid: int = 14,
                      expansion: int = 3, kernel: int = 3) -> dict:
    """Random weights under the public code's key names, BN statistics included."""
    g = torch.Generator().manual_seed(1)
    sd = {}

    def rand(*shape, std=1.):
        return torch.randn(*shape, generator=g) * std

    def conv(name, out, inp, k, bias=False):
        sd[name + '.weight'] = rand(out, inp, k, k, std=(inp * k * k)**-0.5)
        if bias:
            sd[name + '.bias'] = rand(out, std=0.1)

    def norm(name, c, bn=True):
        sd[name + '.weight'] = 1 + rand(c, std=0.2)
        sd[name + '.bias'] = rand(c, std=0.2)
        if bn:
            sd[name + '.running_mean'] = rand(c, std=0.2)
            sd[name + '.running_var'] = 0.5 + torch.rand(c, generator=g)
            sd[name + '.num_batches_tracked'] = torch.tensor(100)

    def linear(name, out, inp):
        sd[name + '.weight'] = rand(out, inp, std=inp**-0.5)
        sd[name + '.bias'] = rand(out, std=0.1)

    conv('patch_embed.conv1', 32, 3, 7)
    norm('patch_embed.bn1', 32)
    conv('patch_embed.conv2', 64, 32, 3)
    norm('patch_embed.bn2', 64)
    conv('patch_embed.conv3', 128, 64, 3)
    norm('patch_embed.bn3', 128)
    conv('patch_embed.proj', embed, 128, 8, bias=True)
    sd['cls_token'] = rand(1, 1, embed, std=0.5)
    sd['pos_embed'] = rand(1, 1 + grid * grid, embed, std=0.5)
    hidden = int(embed * mlp_ratio)
    for i in range(depth):
        p = f'blocks.{i}.'
        norm(p + 'norm1', embed, bn=False)
        norm(p + 'norm2', embed, bn=False)
        if i % 2:
            linear(p + 'attn.qkv', embed, embed)
            conv(p + 'attn.DLA.conv_exp', heads * expansion, heads, 1)
            norm(p + 'attn.DLA.bn1', heads * expansion)
            sd[p + 'attn.DLA.depth_sep_conv.weight'] = rand(heads * expansion, 1, kernel, kernel,
                                                            std=1 / kernel)
            norm(p + 'attn.DLA.bn2', heads * expansion)
            conv(p + 'attn.DLA.conv_pro', heads, heads * expansion, 1)
            norm(p + 'attn.DLA.bn3', heads)
            norm(p + 'attn.adapt_bn', heads)
        else:
            linear(p + 'attn.qkv', 3 * embed, embed)
        linear(p + 'attn.proj', embed, embed)
        linear(p + 'mlp.fc1', hidden, embed)
        linear(p + 'mlp.fc2', embed, hidden)
        sd[p + 'mlp.scale_channel'] = 0.5 + torch.rand(embed, generator=g)
    norm('norm', embed, bn=False)
    linear('head', 10, embed)
    linear('aux_head', 10, embed)
    return sd


def reference_ops(sd: dict, training: bool) -> Tuple[Callable, Callable]:
    """``bn(x, name)`` and ``lin(x, name)`` with the weights of ``sd``; ``training``: BatchNorms
    normalise with the batch statistics and update the running statistics in ``sd``."""

    def bn(x, name):
        return F.batch_norm(x, sd[name + '.running_mean'], sd[name + '.running_var'],
                            sd[name + '.weight'], sd[name + '.bias'], training, 0.1, 1e-5)

    def lin(x, name):
        return F.linear(x, sd[name + '.weight'], sd[name + '.bias'])

    return bn, lin


def reference_stem(sd: dict, img: torch.Tensor, bn: Callable) -> torch.Tensor:
    """The public patch embedding: (B, 3, H, W) -> (B, C, H / 16, W / 16); ``bn(x, name)``
    applies the BatchNorm of that name."""
    x = F.relu(bn(F.conv2d(img, sd['patch_embed.conv1.weight'], stride=2, padding=3),
                  'patch_embed.bn1'))
    x = F.relu(bn(F.conv2d(x, sd['patch_embed.conv2.weight'], padding=1), 'patch_embed.bn2'))
    x = F.relu(bn(F.conv2d(x, sd['patch_embed.conv3.weight'], padding=1), 'patch_embed.bn3'))
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=8)
    return x


def reference_tokens(sd: dict, img: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """Token features (B, 1 + N, C) after the last block, global attention with class token."""

    bn, lin = reference_ops(sd, training=False)
    x = reference_stem(sd, img, bn)
    x = x.flatten(2).transpose(1, 2)
    b, n, c = x.shape
    x = torch.cat([sd['cls_token'].expand(b, 1, c), x], 1) + sd['pos_embed']
    n += 1
    d = c // heads
    scale = d**-0.5
    prev = None
    for i in range(depth):
        p = f'blocks.{i}.'
        h = F.layer_norm(0.5 * x, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        if i % 2 == 0:
            q, k, v = lin(h, p + 'attn.qkv').reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            a = (q * math.sqrt(scale)) @ (k * math.sqrt(scale)).transpose(-2, -1)
            a = a.softmax(-1)
            if prev is not None:
                a = a + scale * prev
            prev = a
        else:
            v = lin(h, p + 'attn.qkv').reshape(b, n, heads, d).transpose(1, 2)
            dla = p + 'attn.DLA.'
            e = F.relu6(bn(F.conv2d(prev, sd[dla + 'conv_exp.weight']), dla + 'bn1'))
            w = sd[dla + 'depth_sep_conv.weight']
            e = F.relu6(bn(F.conv2d(e, w, padding=w.shape[-1] // 2, groups=w.shape[0]),
                           dla + 'bn2'))
            e = bn(F.conv2d(e, sd[dla + 'conv_pro.weight']), dla + 'bn3') + prev
            a = bn(e, p + 'attn.adapt_bn') * scale
        y = lin((a @ v).transpose(1, 2).reshape(b, n, c), p + 'attn.proj')
        x = x + y / 0.5
        h = F.layer_norm(0.5 * x, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        m = lin(F.gelu(lin(h, p + 'mlp.fc1')), p + 'mlp.fc2') * sd[p + 'mlp.scale_channel']
        x = x + m / 0.5
    return x


def reference_windowed_tokens(sd: dict, img: torch.Tensor, depth: int, heads: int, window: int,
                              global_blocks: Sequence[int], training: bool) -> torch.Tensor:
    """Token features (B, h * w, C) after the last block, no class token, the position
    embedding resized bicubically from its square grid to the grid (h, w). Windowed blocks
    attend within the ``window`` x ``window`` windows of the grid zero-padded at the bottom and
    right: padding tokens are masked out as keys, their map rows and columns are zero, and the
    refiner's expanded map is zero at them before its depthwise conv. A map chain restarts where the
    attention changes between windowed and global. ``training``: every BatchNorm normalises
    with the batch statistics and updates the running statistics in ``sd``."""

    bn, lin = reference_ops(sd, training)
    x = reference_stem(sd, img, bn)
    b, c, h, w = x.shape
    pos = sd['pos_embed'][:, 1:]
    side = math.isqrt(pos.shape[1])
    pos = F.interpolate(pos.reshape(1, side, side, c).permute(0, 3, 1, 2), (h, w),
                        mode='bicubic', align_corners=False)
    x = (x + pos).flatten(2).transpose(1, 2)
    d = c // heads
    scale = d**-0.5
    hp, wp = -(-h // window) * window, -(-w // window) * window

    def windows(t):  # (B, h, w, ...) -> (B * windows, window * window, ...), padded with zeros
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, wp - w, 0, hp - h))
        t = t.reshape(b, hp // window, window, wp // window, window, *t.shape[3:])
        return t.transpose(2, 3).reshape(-1, window * window, *t.shape[5:])

    valid = windows(torch.ones(b, h, w, 1, dtype=img.dtype))[..., 0]  # (B', L) 1: real token
    prev, prev_windowed = None, None
    for i in range(depth):
        p = f'blocks.{i}.'
        windowed = i not in global_blocks
        t = F.layer_norm(0.5 * x, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        if windowed:
            t = windows(t.reshape(b, h, w, c))
            keep = valid
        else:
            keep = torch.ones(b, h * w, dtype=img.dtype)
        pairs = (keep[:, :, None] * keep[:, None, :])[:, None]  # (B', 1, L, L)
        n = t.shape[1]
        if i % 2 == 0:
            if windowed != prev_windowed:
                prev = None
            q, k, v = lin(t, p + 'attn.qkv').reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-2, -1) * scale
            a = logits.masked_fill(keep[:, None, None, :] == 0, float('-inf')).softmax(-1)
            if prev is not None:
                a = a + scale * prev
            a = a * keep[:, None, :, None]
            prev = a
        else:
            v = lin(t, p + 'attn.qkv').reshape(-1, n, heads, d).transpose(1, 2)
            dla = p + 'attn.DLA.'
            e = bn(F.conv2d(prev, sd[dla + 'conv_exp.weight']), dla + 'bn1') * pairs
            e = F.relu6(e)
            kernel = sd[dla + 'depth_sep_conv.weight']
            e = F.relu6(bn(F.conv2d(e, kernel, padding=kernel.shape[-1] // 2,
                                    groups=kernel.shape[0]), dla + 'bn2'))
            e = bn(F.conv2d(e, sd[dla + 'conv_pro.weight']), dla + 'bn3') + prev
            a = bn(e, p + 'attn.adapt_bn') * scale * pairs
        prev_windowed = windowed
        y = (a @ v).transpose(1, 2).reshape(-1, n, c)
        if windowed:
            y = y.reshape(b, hp // window, wp // window, window, window, c).transpose(2, 3)
            y = y.reshape(b, hp, wp, c)[:, :h, :w].reshape(b, h * w, c)
        x = x + lin(y, p + 'attn.proj') / 0.5
        t = F.layer_norm(0.5 * x, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        m = lin(F.gelu(lin(t, p + 'mlp.fc1')), p + 'mlp.fc2') * sd[p + 'mlp.scale_channel']
        x = x + m / 0.5
    return x


@pytest.fixture(scope='module')
def public_tiny():
    return public_state_dict(TINY_ARCH['embed_dims'], TINY_ARCH['num_layers'],
                             TINY_ARCH['num_heads'], TINY_ARCH['mlp_ratio'])


def _load_public(model: RefinerViT, sd: dict):
    report = load_state_dict_report(model, model.convert_checkpoint(dict(sd)),
                                    ignore_missing=model._keys_not_in_public_checkpoints)
    assert report.ok, report.format()


def test_matches_independent_reference_at_224_global_with_cls_token(public_tiny):
    model = RefinerViT(arch=TINY_ARCH, global_attn_indexes='all', with_cls_token=True)
    _load_public(model, public_tiny)
    model.double().eval()
    img = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in public_tiny.items()}
    with torch.no_grad():
        (tokens, ), hw = model.forward_tokens(img)
        expected = reference_tokens(sd, img, TINY_ARCH['num_layers'], TINY_ARCH['num_heads'])
    assert hw == (14, 14) and tokens.shape == expected.shape == (1, 197, 48)
    assert expected.abs().max() > 1  # the blocks change the tokens substantially
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('training', [False, True])
def test_matches_independent_reference_with_padded_windows(training):
    """Windowed blocks on a 6x9 grid in 4x4 windows (six windows: full, partial and corner),
    then global blocks, the position embedding resized from 6x6; in training mode every
    BatchNorm (patch embedding, refiner, adapt_bn) uses batch statistics over all windows of
    both images. Float64: tokens, the BN running statistics after the step, and the gradient
    of every parameter, each relative to its own largest value."""
    sd = public_state_dict(TINY_ARCH['embed_dims'], TINY_ARCH['num_layers'],
                           TINY_ARCH['num_heads'], TINY_ARCH['mlp_ratio'], grid=6)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    model = RefinerViT(**dict(TINY, pretrain_img_size=96, drop_path_rate=0.))
    _load_public(model, sd)
    model.double().train(training)
    img = torch.randn(2, 3, 96, 144, dtype=torch.float64)
    (tokens, ), hw = model.forward_tokens(img, blocks=[3])
    ref_sd = {k: v.clone().requires_grad_(k in _public_parameters(sd)) for k, v in sd.items()}
    expected = reference_windowed_tokens(ref_sd, img, TINY_ARCH['num_layers'],
                                         TINY_ARCH['num_heads'], 4, (2, 3), training)
    assert hw == (6, 9) and tokens.shape == expected.shape == (2, 54, 48)
    assert expected.std() > 0.5  # the blocks change the tokens substantially
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-10)

    cotangent = torch.randn(tokens.shape, dtype=torch.float64)
    (tokens * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    ref_grads = model.convert_checkpoint(
        {k: v.grad for k, v in ref_sd.items() if v.requires_grad and v.grad is not None})
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 60
    _assert_each_grad_close(grads, ref_grads, 1e-9)
    initial = model.convert_checkpoint(dict(sd))
    ref_buffers = model.convert_checkpoint({k: v.detach() for k, v in ref_sd.items()})
    stats = [k for k, _ in model.named_buffers() if k.endswith(('running_mean', 'running_var'))]
    assert len(stats) == 2 * (3 + 2 * 4)  # patch embedding, 3 + 1 refiner BNs per sharing block
    for k in stats:
        buf = model.get_buffer(k)
        torch.testing.assert_close(buf, ref_buffers[k], rtol=1e-12, atol=1e-12, msg=k)
        assert torch.equal(buf, initial[k]) is not training, k  # moved in training only


def _public_parameters(sd: dict) -> set:
    """Keys of a public state dict that are parameters (not BN statistics)."""
    return {k for k, v in sd.items() if v.is_floating_point() and
            not k.endswith(('running_mean', 'running_var'))}


def _assert_each_grad_close(grads: dict, ref_grads: dict, rel: float) -> None:
    """Each gradient within ``rel`` of its own largest value. A gradient that is zero in exact
    arithmetic (a bias right before a training-mode BatchNorm: its float64 reference is below
    1e-12 of the largest gradient of all) must be within ``rel`` of that largest gradient."""
    largest = max((float(g.abs().max()) for g in ref_grads.values()), default=0.)
    for k, ref in ref_grads.items():
        scale = float(ref.abs().max())
        grad = grads[k].to(ref.dtype)
        if scale < 1e-12 * largest:  # cancelled: zero up to rounding in both
            assert float(grad.abs().max()) <= rel * largest, k
            continue
        torch.testing.assert_close(grad, ref, rtol=0, atol=rel * scale, msg=k)


def test_parameter_count_of_small_equals_public_trunk():
    model = RefinerViT('small', global_attn_indexes='all', with_cls_token=True)
    trunk = sum(p.numel() for name, p in model.named_parameters()
                if not name.startswith(('pyramid', 'out_norm')))
    assert trunk == 24_637_888
    assert model.num_features == [384] * 4


@pytest.mark.parametrize('arch,count', [('medium', 54_608_092), ('large', 80_123_168)])
def test_parameter_count_of_medium_and_large_on_meta_device(arch, count):
    with torch.device('meta'):
        model = RefinerViT(arch, global_attn_indexes='all', with_cls_token=True)
    assert sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(('pyramid', 'out_norm'))) == count


@pytest.mark.parametrize('size,global_blocks', [((224, 224), (2, 3)), ((512, 512), (2, 3)),
                                                ((800, 1216), ()), ((100, 150), (0, 1))])
def test_forward_backward_shapes(size, global_blocks):
    model = RefinerViT(**dict(TINY, window_size=14, global_attn_indexes=global_blocks,
                              drop_path_rate=0.1))
    outs = model(torch.randn(1, 3, *size))
    assert [o.shape for o in outs] == [
        (1, 48, math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('size', [(200, 328), (7, 9), (49, 50)])
def test_pyramid_is_cropped_to_the_real_pixels(size):
    """The token grid covers the image zero-padded to a multiple of 16; each level is cropped
    to ceil(H/s) x ceil(W/s), and the kept features equal those of the padded image."""
    model = RefinerViT(**TINY).eval()
    img = torch.randn(1, 3, *size)
    padded = F.pad(img, (0, -size[1] % 16, 0, -size[0] % 16))
    with torch.no_grad():
        outs, full = model(img), model(padded)
    for stride, out, ref in zip((4, 8, 16, 32), outs, full):
        rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        assert out.shape[-2:] == (rows, cols)
        torch.testing.assert_close(out, ref[..., :rows, :cols])
    assert outs[0].shape[-2] < full[0].shape[-2] or size[0] % 16 == 0


def test_padded_window_equals_global_attention_on_the_same_tokens(public_tiny):
    """A 3x4 grid in one 4x4 window: the padding row is masked (softmax keys, refiner convs,
    values), so windowed refined attention equals global refined attention on the 12 tokens."""
    windowed = RefinerViT(**dict(TINY, global_attn_indexes=()))
    global_ = RefinerViT(**dict(TINY, global_attn_indexes='all'))
    for model in (windowed, global_):
        _load_public(model, public_tiny)
        model.double().eval()
    img = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        (a, ), hw = windowed.forward_tokens(img)
        (b, ), _ = global_.forward_tokens(img)
    assert hw == (3, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize('mode', ['eval', 'train_norm_eval'])
def test_images_of_a_batch_do_not_influence_each_other(public_tiny, mode):
    model = RefinerViT(**dict(TINY, norm_eval=True))
    _load_public(model, public_tiny)
    model.double().train(mode != 'eval')
    imgs = torch.randn(2, 3, 88, 120, dtype=torch.float64)  # 6x8 grid: partial windows
    batch = model(imgs)
    single = model(imgs[1:])
    for out_batch, out_single in zip(batch, single):
        torch.testing.assert_close(out_batch[1:], out_single, rtol=0, atol=1e-10)


def test_position_embedding_is_interpolated_to_the_grid():
    model = RefinerViT(**TINY).eval()
    with torch.no_grad():
        (tokens, ), hw = model.forward_tokens(torch.randn(1, 3, 200, 328))
    assert hw == (13, 21) and tokens.shape == (1, 13 * 21, 48)


def test_out_indices_and_pyramid_block_indexes():
    model = RefinerViT(**TINY, out_indices=(1, 3), pyramid_block_indexes=(0, 1, 2, 1))
    assert {name.split('.')[1] for name, _ in model.pyramid.named_parameters(prefix='p')} == \
        {'level1'}
    assert not hasattr(model, 'out_norm0') and model._feature_blocks == [1]
    outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape for o in outs] == [(1, 48, 8, 12), (1, 48, 2, 3)]
    sum(o.mean() for o in outs).backward()
    # only blocks up to the deepest feeding block are built (and run)
    assert len(model.blocks) == 2
    assert model.blocks[1].attn.v.weight.grad is not None


def test_a_batch_of_one_one_token_image_in_training_names_the_remedies():
    """Its refiner BatchNorms would see one value per channel (the global sharing block of a
    1x1 grid): a clear error instead of BatchNorm's, and each remedy works."""
    kwargs = dict(arch=TINY_ARCH, window_size=4, global_attn_indexes=(2, 3))
    model = RefinerViT(**kwargs).train()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r'batch of 1 image of \(16, 16\) pixels.*1x1 token grid'
                       r'.*block 3.*norm_eval=True.*batch of more than 1 image.*larger than '
                       r'16x16 pixels'):
        model(x)
    assert RefinerViT(**kwargs, norm_eval=True).train()(x)[0].shape == (1, 48, 4, 4)
    assert model(torch.randn(2, 3, 16, 16))[0].shape == (2, 48, 4, 4)
    assert model(torch.randn(1, 3, 17, 16))[0].shape == (1, 48, 5, 4)
    assert model.eval()(x)[0].shape == (1, 48, 4, 4)
    cls_token = RefinerViT(arch=TINY_ARCH, global_attn_indexes='all', with_cls_token=True)
    assert cls_token.train()(x)[0].shape == (1, 48, 4, 4)  # 2 tokens: 4 values per channel
    with pytest.raises(ValueError, match='block 1'):
        RefinerViT(arch=TINY_ARCH, window_size=1, global_attn_indexes=()).train()(x)


def test_drop_path_increases_linearly():
    model = RefinerViT(**TINY, drop_path_rate=0.3)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert model.blocks[3].drop_path.drop_prob == pytest.approx(0.3)


def test_default_global_blocks_are_a_quarter_of_the_blocks_in_pairs():
    with torch.device('meta'):
        small = RefinerViT('small')
        large = RefinerViT('large')
    assert [i for i, b in enumerate(small.blocks) if not b.attn.window_size] == [6, 7, 14, 15]
    assert [i for i, b in enumerate(large.blocks) if not b.attn.window_size] == \
        [6, 7, 14, 15, 22, 23, 30, 31]


def test_pretrained_init_cfg_converts_public_checkpoint(tmp_path, public_tiny):
    sd = public_state_dict(48, 4, 4, 2., grid=24)  # a 384x384 checkpoint
    sd['blocks.0.attn.unknown'] = torch.zeros(1)
    path = osp.join(tmp_path, 'refiner.pth')
    torch.save({'model': sd}, path)
    model = RefinerViT(**TINY, pretrain_img_size=256,
                       init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    report = model.load_report
    assert report.unexpected == ['blocks.0.attn.unknown']
    assert not report.missing and not report.mismatched
    assert model.pos_embed.shape == (1, 256, 48)
    torch.testing.assert_close(model.blocks[1].attn.v.weight, sd['blocks.1.attn.qkv.weight'])
    torch.testing.assert_close(model.blocks[1].attn.dla.bn1.running_var,
                               sd['blocks.1.attn.DLA.bn1.running_var'])
    # a converted checkpoint converts to itself
    converted = model.convert_checkpoint(dict(model.state_dict()))
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_converter_drops_heads_and_keeps_class_token_only_when_used(public_tiny):
    plain = RefinerViT(**TINY).convert_checkpoint(dict(public_tiny))
    assert not any(k.startswith(('head.', 'aux_head.', 'norm.', 'cls_token')) for k in plain)
    assert plain['pos_embed'].shape == (1, 196, 48)
    torch.testing.assert_close(plain['pos_embed'], public_tiny['pos_embed'][:, 1:])
    with_cls = RefinerViT(arch=TINY_ARCH, global_attn_indexes='all',
                          with_cls_token=True).convert_checkpoint(dict(public_tiny))
    assert with_cls['pos_embed'].shape == (1, 197, 48) and 'cls_token' in with_cls


@pytest.mark.parametrize('kwargs,match', [
    (dict(arch=dict(embed_dims=48, num_layers=4)), 'num_heads'),
    (dict(window_size=0), 'window_size'),
    (dict(global_attn_indexes=(0, 1, 9)), 'global_attn_indexes'),
    (dict(global_attn_indexes='some'), 'global_attn_indexes'),
    (dict(with_cls_token=True), 'with_cls_token'),
    (dict(pyramid_block_indexes=(0, 1)), 'pyramid_block_indexes'),
    (dict(pyramid_block_indexes=(0, 1, 2, 4)), 'pyramid_block_indexes'),
    (dict(frozen_stages=5), 'frozen_stages'),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefinerViT(**dict(TINY, **kwargs))


def _mim_config(package: str, path: str):
    import importlib

    from mmengine.config import Config
    root = osp.dirname(importlib.import_module(package).__file__)
    return Config.fromfile(osp.join(root, '.mim', 'configs', path))


def _refiner_backbone() -> dict:
    return dict(type='RefinerViT', **dict(TINY, window_size=2, global_attn_indexes=(2, 3)))


def test_drops_into_mmdet_swin_mask_rcnn_config_with_only_in_channels_changed():
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    cfg = _mim_config('mmdet', 'swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    cfg.model.backbone = _refiner_backbone()
    cfg.model.neck.in_channels = [48] * 4
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        packed = demo_mm_inputs(2, [[3, 160, 224], [3, 224, 192]], num_items=[3, 2],
                                with_mask=True)
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
    loss = sum(v if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items()
               if 'loss' in k)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_drops_into_mmseg_swin_upernet_config_with_only_in_channels_changed():
    from mmengine.registry import DefaultScope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = _mim_config(
        'mmseg', 'swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py')
    cfg.model.backbone = _refiner_backbone()
    cfg.model.decode_head.in_channels = [48] * 4
    cfg.model.auxiliary_head.in_channels = 48
    # for test speed only (the config trains 512x512 crops with 512 head channels)
    cfg.model.data_preprocessor.size = (128, 128)
    cfg.model.decode_head.channels = 32
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
        samples = []
        for _ in range(2):
            sample = SegDataSample()
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 128, 128)))
            samples.append(sample)
        data = model.data_preprocessor(
            dict(inputs=[torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)] * 2,
                 data_samples=samples), True)
        losses = model(**data, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


# -- the refiner's fast paths (DistributedLocalAttention.refine) against its module-by-module
# formulation (DistributedLocalAttention.forward, then adapt_bn, scale and mask) ----------------
def _chunks_of_rows(elements: int) -> ChunkPolicy:
    """A chunk policy of ``elements`` expanded elements per chunk on the CPU, however few rows
    that is."""
    return ChunkPolicy(chunk_elements={'cpu': elements}, min_rows=1)


def _random_refiner(heads: int, kernel: int, dtype: torch.dtype, momentum=0.1,
                    chunk_policy: ChunkPolicy = DEFAULT_CHUNK_POLICY):
    g = torch.Generator().manual_seed(2)
    dla = DistributedLocalAttention(heads, 3, kernel, chunk_policy=chunk_policy)
    adapt_bn = torch.nn.BatchNorm2d(heads, momentum=momentum)
    for conv in (dla.conv_exp, dla.depth_sep_conv, dla.conv_pro):
        fan_in = conv.weight[0].numel()
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * fan_in**-0.5
    for bn in [m for m in dla.modules() if isinstance(m, torch.nn.BatchNorm2d)] + [adapt_bn]:
        c = bn.num_features
        bn.momentum = momentum
        bn.weight.data = 1 + 0.3 * torch.randn(c, generator=g)
        bn.bias.data = 0.3 * torch.randn(c, generator=g)
        bn.running_mean.data = 0.2 * torch.randn(c, generator=g)
        bn.running_var.data = 0.5 + torch.rand(c, generator=g)
    return dla.to(dtype), adapt_bn.to(dtype)


def _reference_refine(dla, adapt_bn, attn, scale, mask):
    out = adapt_bn(dla(attn, mask)) * scale
    return out if mask is None else out.masked_fill(~mask, 0.)


def _refine_step(dla, adapt_bn, attn, grad, fn):
    """Output, input gradient, parameter gradients and buffers after one refine + backward."""
    attn = attn.clone().requires_grad_()
    out = fn(dla, adapt_bn, attn)
    (out * grad).sum().backward()
    params = [p.grad for p in [*dla.parameters(), *adapt_bn.parameters()]]
    buffers = [b.clone() for b in [*dla.buffers(), *adapt_bn.buffers()]]
    return out.detach(), attn.grad, params, buffers


# The float32 refiner's parameter gradients against float64, each relative to its own largest
# value (measured: up to 5.3e-6, bn3's weight).
REFINE_FLOAT32_GRAD_RTOL = 2e-5


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('mode,kernel,momentum', [
    ('train', 3, 0.1), ('train', 3, None), ('train', 2, 0.1), ('train_bn1_eval', 3, 0.1),
    ('eval', 3, 0.1), ('eval', 2, 0.1)])
@pytest.mark.parametrize('masked', [False, True])
def test_refine_equals_the_module_by_module_refiner(dtype, mode, kernel, momentum, masked):
    """Every path of ``refine`` (training BNs: the chunked autograd Function, or with an even
    kernel / mixed BN modes the recomputed module formulation; running-statistics BNs: folded
    into the convs) gives the refiner's numbers: outputs (float32: 1e-5 relative), gradients of
    the map and of every parameter, and the BN buffer updates. Chunks of 3 query rows with the
    depthwise conv's halo, 11 rows: chunk edges and a partial last chunk are exercised."""
    b, heads, n = 2, 4, 11
    chunk_policy = _chunks_of_rows(3 * b * 3 * heads * n)
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(b, heads, n, n, generator=g, dtype=dtype).softmax(-1) * 4
    grad = torch.randn(b, heads, n, n, generator=g, dtype=dtype)
    mask = None
    if masked:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[0, 7:] = False
        valid[1, 3] = False
        mask = valid[:, None, :, None] & valid[:, None, None, :]
        grad = grad.masked_fill(~mask, 0.)
    def run(fn, dtype):
        dla, adapt_bn = _random_refiner(heads, kernel, dtype, momentum, chunk_policy)
        dla.train(mode != 'eval')
        adapt_bn.train(mode != 'eval')
        if mode == 'train_bn1_eval':
            dla.bn1.eval()
        return _refine_step(dla, adapt_bn, attn.to(dtype), grad.to(dtype), fn)

    reference = lambda d, a, x: _reference_refine(d, a, x, 0.125, mask)  # noqa: E731
    out, attn_grad, param_grads, buffers = run(lambda d, a, x: d.refine(x, a, 0.125, mask),
                                               dtype)
    ref_out, ref_attn_grad, ref_grads, ref_buffers = run(reference, dtype)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert ref_out.abs().max() > 0.1
    torch.testing.assert_close(out, ref_out, rtol=0, atol=rel * ref_out.abs().max())
    torch.testing.assert_close(attn_grad, ref_attn_grad, rtol=0,
                               atol=rel * ref_attn_grad.abs().max())
    if dtype == torch.float32:
        # parameter gradients that largely cancel (e.g. bn1's, before the masks and a
        # training-mode BN) are ill-conditioned in float32: both formulations against float64
        exact = run(reference, torch.float64)[2]
        _assert_each_grad_close(dict(enumerate(param_grads)), dict(enumerate(exact)),
                                REFINE_FLOAT32_GRAD_RTOL)
    else:
        _assert_each_grad_close(dict(enumerate(param_grads)), dict(enumerate(ref_grads)), rel)
    for buf, ref_buf in zip(buffers, ref_buffers):
        torch.testing.assert_close(buf, ref_buf, rtol=rel, atol=rel)
    if mode == 'train':  # the running statistics moved
        initial = _random_refiner(heads, kernel, dtype)[0].bn1.running_mean
        assert not torch.allclose(buffers[1], initial)


def test_refine_float32_on_nearly_uniform_maps_matches_float64():
    """Nearly uniform maps (as at initialisation) make bn1's scale large: the batch-statistics
    path computes bn1 on the centred map, so that its float32 output and map gradient stay
    within 1e-5 of a float64 evaluation on the same input (measured: map gradient 2e-7; the
    module formulation 2e-6; bn1 folded onto the uncentred map: 0.1). Parameter gradients,
    each relative to its own largest value, are ill-conditioned here for bn1's and bn3's
    weights (the float32 module formulation: 1.3e-4 and 1.0e-3 from float64; refine: 4.4e-5
    and 1.3e-3): each within twice the module formulation's error, or 1e-5."""
    torch.manual_seed(0)
    dla, adapt_bn = DistributedLocalAttention(4), torch.nn.BatchNorm2d(4)
    g = torch.Generator().manual_seed(5)
    attn = (0.01 * torch.randn(2, 4, 35, 35, generator=g)).softmax(-1)
    grad = torch.randn(2, 4, 35, 35, generator=g)
    results = []
    for dtype, step in ((torch.float32, lambda m, a, x: m.refine(x, a, 0.125, None)),
                        (torch.float32, lambda m, a, x: _reference_refine(m, a, x, 0.125, None)),
                        (torch.float64, lambda m, a, x: _reference_refine(m, a, x, 0.125, None))):
        d, bn = copy.deepcopy(dla).to(dtype), copy.deepcopy(adapt_bn).to(dtype)
        out, attn_grad, params, _ = _refine_step(d, bn, attn.to(dtype), grad.to(dtype), step)
        results.append((out.double(), attn_grad.double(), [p.double() for p in params]))
    (out, attn_grad, params), (_, _, module_params), (ref_out, ref_attn_grad, ref_params) = \
        results
    for value, ref_value in ((out, ref_out), (attn_grad, ref_attn_grad)):
        torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-5 * ref_value.abs().max())
    largest = max(float(p.abs().max()) for p in ref_params)
    for i, (p, module_p, ref_p) in enumerate(zip(params, module_params, ref_params)):
        scale = float(ref_p.abs().max())
        if scale < 1e-12 * largest:  # bn3's bias: zero in exact arithmetic
            assert float(p.abs().max()) <= 1e-5 * largest, i
            continue
        module_error = float((module_p - ref_p).abs().max())
        torch.testing.assert_close(p, ref_p, rtol=0, atol=max(2 * module_error, 1e-5 * scale),
                                   msg=str(i))


@pytest.mark.parametrize('expansion', [1, 2])
def test_refine_with_batch_stats_and_small_expansions(expansion):
    """The chunked training Function with ``dla_expansion`` 1 and 2 (its chunk buffers are
    sized for the expanded maps and for the map with a row of ones appended, whichever is
    larger): outputs and gradients as the module formulation, float64."""
    b, heads, n = 2, 4, 11
    torch.manual_seed(0)
    dla = DistributedLocalAttention(
        heads, expansion, chunk_policy=_chunks_of_rows(3 * b * expansion * heads * n)).double()
    adapt_bn = torch.nn.BatchNorm2d(heads).double()
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(b, heads, n, n, generator=g, dtype=torch.float64).softmax(-1)
    grad = torch.randn(b, heads, n, n, generator=g, dtype=torch.float64)
    results = [
        _refine_step(copy.deepcopy(dla), copy.deepcopy(adapt_bn), attn, grad, fn)
        for fn in (lambda d, a, x: d.refine(x, a, 0.125),
                   lambda d, a, x: _reference_refine(d, a, x, 0.125, None))]
    _assert_refine_steps_close(*results, rel=1e-10)


@pytest.mark.parametrize('grid,mode,kernel', [((9, 11), 'train', 3), ((6, 6), 'train', 3),
                                               ((9, 11), 'eval', 3), ((9, 11), 'eval', 2)])
def test_refine_on_padded_windows_computes_only_the_reach_of_real_tokens(grid, mode, kernel):
    """Windows of a padded grid (4x4 windows of a 9x11 grid: full, partial and corner windows;
    of a 6x6 grid: half padding): the refiner computes the expanded maps only on the rows and
    columns within the depthwise conv's reach of real tokens, grouped by window shape (in
    training the constant rest enters the statistics in closed form; in eval the output is
    zero there); outputs, map and parameter gradients and running statistics equal the module
    formulation (float64, several chunks per piece)."""
    from mmvit_plugins.models.layers import window_padding_mask
    heads, window = 4, 4
    padding = window_padding_mask(grid, window, torch.device('cpu')).repeat(2, 1)
    valid = ~padding
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    b, n = valid.shape
    chunk_policy = _chunks_of_rows(3 * b * 3 * heads * n)
    pieces, far = padded_window_layout(grid, window, b, kernel // 2, mask.device)
    assert len(pieces) > 1 and far > 0 and not any(p.whole for p in pieces)
    g = torch.Generator().manual_seed(11)
    attn = (torch.rand(b, heads, n, n, generator=g, dtype=torch.float64) * 4).softmax(-1)
    attn = attn * mask  # as the computing block passes it: zero at padding tokens
    grad = torch.randn(b, heads, n, n, generator=g, dtype=torch.float64).masked_fill(~mask, 0.)
    results = []
    for fn in (lambda d, a, x: d.refine(x, a, 0.125, mask, (grid, window)),
               lambda d, a, x: _reference_refine(d, a, x, 0.125, mask)):
        dla, adapt_bn = _random_refiner(heads, kernel, torch.float64, chunk_policy=chunk_policy)
        train = mode == 'train'
        results.append(_refine_step(dla.train(train), adapt_bn.train(train), attn, grad, fn))
    _assert_refine_steps_close(*results, rel=1e-10)
    for buf, ref_buf in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(buf, ref_buf, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('grid', [(9, 11), (3, 3)])
@pytest.mark.parametrize('accumulate', [False, True])
def test_pieces_scatter_back_with_one_operation_or_one_per_window(grid, accumulate):
    """``MapPiece.scatter_`` one ``index_copy_``/``index_add_`` per window (the CPU's) or one
    over the flattened maps (other devices'): both set (add to) exactly the entries that
    ``gather`` reads, bit for bit, and leave every other entry; pieces of some windows (a 9x11
    grid of 4x4 windows) and of all windows (a 3x3 grid: one partial window per image)."""
    window, batch, heads = 4, 2, 3
    num_maps = batch * math.ceil(grid[0] / window) * math.ceil(grid[1] / window)
    pieces, _ = padded_window_layout(grid, window, num_maps, 1, torch.device('cpu'))
    assert any(p.entries is not None for p in pieces)
    assert any(p.windows is None for p in pieces) == (grid == (3, 3))
    g = torch.Generator().manual_seed(13)
    for piece in pieces:
        full = torch.randn(num_maps, heads, window**2, window**2, generator=g, dtype=torch.float64)
        values = torch.randn(piece.gather(full).shape, generator=g, dtype=torch.float64)
        results = []
        for per_window in (True, False):
            tiling = ChunkPolicy(scatter_per_window_on=('cpu', ) if per_window else ()).tiling(
                full.device)
            assert tiling.scatter_per_window == per_window
            results.append(piece.scatter_(full.clone(), values, tiling, accumulate))
        assert torch.equal(results[0], results[1])
        expected = piece.gather(full) + values if accumulate else values
        assert torch.equal(piece.gather(results[1]), expected)
        assert int((results[1] != full).sum()) == values.numel()


class _CountConvolutions(TorchDispatchMode):
    """Counts the convolutions dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.convolution.default
        return func(*args, **(kwargs or {}))


def test_the_injected_chunk_policy_decides_the_row_chunks():
    """A refiner's ``chunk_policy`` sizes its chunks of query rows: ``chunk_elements //
    row_elements`` rows (at least ``min_rows``) with the depthwise conv's halo, per device type
    (others: ``default_chunk_elements``), one chunk when unchunked; the folded path runs one
    depthwise conv per chunk (counted at dispatch: 4 chunks of 11 rows by 3) with the output of
    one chunk of all rows."""
    policy = ChunkPolicy(chunk_elements={'cpu': 30}, default_chunk_elements=60, min_rows=2)
    assert policy.tiling(torch.device('cpu')) == Tiling(30, 2, True)
    assert policy.tiling(torch.device('meta')) == Tiling(60, 2, False)
    tiling = policy.tiling(torch.device('cpu'))
    assert tiling.row_chunks(11, 10, (1, 1)) == [(0, 3, 0, 4), (3, 6, 2, 7), (6, 9, 5, 10),
                                                 (9, 11, 8, 11)]
    assert tiling.row_chunks(11, 20, (1, 2))[:2] == [(0, 2, 0, 4), (2, 4, 1, 6)]
    assert Tiling(None, 2, True).row_chunks(11, 10, (1, 1)) == [(0, 11, 0, 11)]
    b, heads, n = 2, 4, 11
    g = torch.Generator().manual_seed(6)
    attn = torch.rand(b, heads, n, n, generator=g, dtype=torch.float64).softmax(-1)
    outs = []
    for chunk_policy, convs in ((_chunks_of_rows(3 * b * 3 * heads * n), 4),
                                (DEFAULT_CHUNK_POLICY, 1)):
        dla, adapt_bn = _random_refiner(heads, 3, torch.float64, chunk_policy=chunk_policy)
        with torch.no_grad(), _CountConvolutions() as counter:
            outs.append(dla.eval().refine(attn, adapt_bn.eval(), 0.125))
        assert counter.count == convs
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


def _assert_refine_steps_close(step: Sequence, ref: Sequence, rel: float) -> None:
    """Output, map gradient and parameter gradients of two :func:`_refine_step` results: each
    within ``rel`` of the largest value of its reference (see :func:`_assert_each_grad_close`
    for parameters)."""
    (out, attn_grad, params), (ref_out, ref_attn_grad, ref_params) = step[:3], ref[:3]
    for value, ref_value in ((out, ref_out), (attn_grad, ref_attn_grad)):
        torch.testing.assert_close(value, ref_value, rtol=0, atol=rel * ref_value.abs().max())
    _assert_each_grad_close(dict(enumerate(params)), dict(enumerate(ref_params)), rel)


def _assert_grads_close(grads: dict, ref_grads: dict, rel: float) -> None:
    """The same parameters, each gradient within ``rel`` of its own largest value."""
    assert grads.keys() == ref_grads.keys()
    _assert_each_grad_close(grads, ref_grads, rel)


@pytest.mark.parametrize('mode', ['train', 'eval', 'train_norm_eval'])
def test_backbone_equals_the_module_by_module_refiner(monkeypatch, mode):
    """The whole backbone (windows with padding, global blocks) with ``refine`` replaced by the
    module-by-module refiner: the same outputs (float32, 1e-5 relative), gradients and BN
    running statistics. With batch-statistics BNs in float64: at initialisation the maps are
    nearly uniform and these gradients ill-conditioned (see test_refiner_compiles_in_one_graph),
    so float32 would compare the roundings of the two formulations."""
    dtype = torch.float64 if mode == 'train' else torch.float32
    rel = 1e-9 if mode == 'train' else 1e-5
    img = torch.randn(2, 3, 88, 120, dtype=dtype)  # 6x8 grid: partial 4x4 windows

    def run(reference: bool):
        torch.manual_seed(0)
        model = RefinerViT(**dict(TINY, norm_eval=mode == 'train_norm_eval')).to(dtype)
        model.train(mode != 'eval')
        with monkeypatch.context() as patch:
            if reference:
                patch.setattr(DistributedLocalAttention, 'refine', lambda self, a, bn, s, m=None,
                              windows=None: _reference_refine(self, bn, a, s, m))
            outs = model(img)
            sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
                for o in outs).backward()
        return outs, model

    outs, model = run(False)
    ref_outs, ref_model = run(True)
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref, rtol=0, atol=rel * float(ref.abs().max()))
    grads = dict((k, p.grad) for k, p in model.named_parameters())
    ref_grads = dict((k, p.grad) for k, p in ref_model.named_parameters())
    _assert_grads_close(grads, ref_grads, 2 * rel)  # measured: 6.5e-12 (train), 9.5e-6
    for (k, buf), ref in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(buf, ref, rtol=rel, atol=rel / 10, msg=k)


@pytest.mark.parametrize('train', [False, True])
def test_refiner_compiles_in_one_graph(train):
    """torch.compile(fullgraph=True) through every refiner path: eval (folded BNs) and a
    training step (the autograd Function), equal to eager.

    The training step runs in float64: at initialisation the attention maps are nearly
    uniform, and the gradients through the refiner's batch-statistics BNs are then
    ill-conditioned in the map (measured on this model: a 3e-7 relative change of the global
    map moves its float64 gradient by 18 %), so float32 would compare roundings, not graphs."""
    torch.manual_seed(0)
    dtype = torch.float64 if train else torch.float32
    model = RefinerViT(**dict(TINY, global_attn_indexes=(2, 3))).train(train).to(dtype)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    img = torch.randn(2, 3, 72, 104, dtype=dtype)
    outs = []
    for m in (model, compiled):
        model.zero_grad()
        with torch.set_grad_enabled(train):
            out = m(img)
        if train:  # not the plain sum: the out norms make its gradient vanish
            sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
                for o in out).backward()
        outs.append((out, {k: p.grad.clone() for k, p in model.named_parameters()
                           if p.grad is not None}))
    (eager, eager_grads), (comp, comp_grads) = outs
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    if train:  # float64; aot_eager's decompositions: 1.2e-7 measured, per parameter
        _assert_grads_close(comp_grads, eager_grads, 1e-6)


# -- refiner_impl: the fused and the reference implementation --------------------------------
def test_refiner_impl_from_the_argument_else_the_environment_variable_at_build(monkeypatch):
    """``refiner_impl`` (checked, naming the allowed values) wins over ``MMVIT_REFINER_IMPL``
    (checked too), which wins over 'auto'; every refiner takes the model's choice when the
    model is built, a later change of the environment changes nothing, assigning the model's
    attribute changes every refiner's; the timm model passes the argument on."""
    from mmvit_plugins.models.timm_models import RefinerViTClassifier

    def impls(model):
        return {m.refiner_impl for name, m in model.named_modules() if name.endswith('.dla')}

    monkeypatch.delenv('MMVIT_REFINER_IMPL', raising=False)
    assert impls(RefinerViT(**TINY)) == {'auto'}
    monkeypatch.setenv('MMVIT_REFINER_IMPL', 'reference')
    model = RefinerViT(**TINY)
    monkeypatch.setenv('MMVIT_REFINER_IMPL', 'fused')
    assert model.refiner_impl == 'reference' and impls(model) == {'reference'}
    assert impls(RefinerViT(**TINY)) == {'fused'}
    assert impls(RefinerViT(**TINY, refiner_impl='auto')) == {'auto'}
    model.refiner_impl = 'auto'
    assert model.refiner_impl == 'auto' and impls(model) == {'auto'}
    with pytest.raises(ValueError, match='refiner_impl=.gpu. is invalid'):
        model.refiner_impl = 'gpu'
    timm_model = RefinerViTClassifier(arch=TINY_ARCH, window_size=4, refiner_impl='reference')
    assert impls(timm_model) == {'reference'}
    with pytest.raises(ValueError, match=r"refiner_impl='cuda' is invalid; allowed values: "
                                         r"\('auto', 'fused', 'reference'\)"):
        RefinerViT(**TINY, refiner_impl='cuda')
    monkeypatch.setenv('MMVIT_REFINER_IMPL', 'Fused')
    with pytest.raises(ValueError, match=r"MMVIT_REFINER_IMPL='Fused' is invalid; allowed "
                                         r"values: \('auto', 'fused', 'reference'\)"):
        RefinerViT(**TINY)


def _refiner_step(model: RefinerViT, img: torch.Tensor):
    """Outputs, input gradient, parameter gradients and buffers after one forward + backward
    of a weighted sum of the outputs (the out norms make the plain sum's gradient vanish)."""
    img = img.clone().requires_grad_()
    outs = model(img)
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
        for o in outs).backward()
    return (outs, img.grad, {k: p.grad for k, p in model.named_parameters()},
            dict(model.named_buffers()))


@pytest.mark.parametrize('mode', ['train', 'eval', 'train_norm_eval'])
@pytest.mark.parametrize('size', [(87, 121), (64, 128)])
def test_fused_and_reference_refiner_impls_agree(mode, size):
    """The two implementations of every refiner, windowed (blocks 0, 1: partial windows at the
    odd size, whole windows at 64x128) and global (blocks 2, 3), in float64: the same outputs,
    image and parameter gradients and BN running statistics after a training step, whichever
    BN statistics the refiners use."""
    g = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    results = []
    for impl in ('fused', 'reference'):
        torch.manual_seed(0)
        model = RefinerViT(**TINY, norm_eval=mode == 'train_norm_eval', refiner_impl=impl)
        results.append(_refiner_step(model.double().train(mode != 'eval'), img))
    (outs, img_grad, grads, buffers), (ref_outs, ref_img_grad, ref_grads, ref_buffers) = results
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(img_grad, ref_img_grad, rtol=0,
                               atol=1e-9 * float(ref_img_grad.abs().max()))
    _assert_grads_close(grads, ref_grads, 1e-9)
    assert buffers.keys() == ref_buffers.keys()
    for k, ref in ref_buffers.items():
        torch.testing.assert_close(buffers[k], ref, rtol=1e-10, atol=1e-12, msg=k)
    if mode == 'train':  # the refiners' running statistics moved
        assert not torch.equal(buffers['blocks.1.attn.dla.bn2.running_var'],
                               torch.ones_like(buffers['blocks.1.attn.dla.bn2.running_var']))


@pytest.mark.parametrize('device', ['cpu', 'meta'])
@pytest.mark.parametrize('impl', ['auto', 'fused', 'reference'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_refiner_impl_runs_the_chosen_path_on_every_device(monkeypatch, device, impl, mode):
    """Each implementation of a refiner on padded windows (a 9x11 grid of 4x4 windows) on each
    device the tests reach ('meta' takes the non-CPU branches: chunk sizes, 'auto''s default):
    the path it names runs (for 'auto' the one chosen for the device type), the output and the
    gradients of the map and of every parameter have their shapes and are on the device. In
    eval mode on 'meta' without autograd: the eval path under autograd recomputes in its
    backward through ``torch.utils.checkpoint``, which has no 'meta' device module."""
    from mmvit_plugins.models.layers import window_padding_mask
    calls = []
    reference = DistributedLocalAttention._refine_reference
    monkeypatch.setattr(DistributedLocalAttention, '_refine_reference',
                        lambda self, *args: calls.append(self) or reference(self, *args))
    grid, window, heads = (9, 11), 4, 4
    valid = ~window_padding_mask(grid, window, torch.device(device)).repeat(2, 1)
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    with torch.device(device):
        dla = DistributedLocalAttention(heads, refiner_impl=impl)
        adapt_bn = torch.nn.BatchNorm2d(heads)
        attn = torch.rand(len(valid), heads, window**2, window**2).softmax(-1) * mask
    grad = mode == 'train' or device == 'cpu'
    attn.requires_grad_(grad)
    dla.train(mode == 'train')
    adapt_bn.train(mode == 'train')
    with torch.set_grad_enabled(grad):
        out = dla.refine(attn, adapt_bn, 0.125, mask, (grid, window))
    chosen = refiner_impl_on(impl, torch.device(device))
    assert chosen == (impl if impl != 'auto' else 'fused')
    assert calls == ([dla] if chosen == 'reference' else [])
    assert out.shape == attn.shape and out.device.type == device
    assert all(b.device.type == device for b in dla.buffers())
    if grad:
        out.sum().backward()
        params = [*dla.parameters(), *adapt_bn.parameters()]
        assert attn.grad.shape == attn.shape and attn.grad.device.type == device
        assert all(p.grad.shape == p.shape and p.grad.device.type == device for p in params)
