"""Mixed precision as a supported mode of every backbone: bf16 autocast on CPU (the path
CUDA's fp16/bf16 autocast takes too), and models cast to 16-bit floats."""
import pytest
import torch

from mmvit_plugins.models.backbones import base
from mmvit_plugins.models.backbones.maformer import GLD
from tests.test_backbones import NAMES, build

SIZE = (72, 104)  # non-square, and not the tiny MAFormer's 64x64 pretraining grid
# Relative errors of bf16 autocast against fp32 (||out diff|| / ||out|| per output, and
# ||grad diff|| / ||grad|| over all parameters), measured over 3 seeds: 0.7-1.0 % for the
# outputs of every backbone and 0.7-1.2 % for the gradients of all but RefinerViT (7-11 %: its
# BNs normalise near-uniform attention maps, which magnifies the rounding of q and k even though
# the maps themselves stay in fp32); mmdet's Swin at the same widths: 0.9-1.0 % and 0.9-1.2 %.
OUT_TOL = 0.02
GRAD_TOL = {'BOATSwin': 0.02, 'BOATCSWin': 0.02, 'MAFormer': 0.02, 'RefinerViT': 0.15}


def _loss(outs, weights) -> torch.Tensor:
    """A random linear read-out: a squared-mean loss of LayerNorm outputs has ~zero gradient."""
    return sum((o.float() * w).mean() for o, w in zip(outs, weights))


@pytest.mark.parametrize('name', NAMES)
def test_bf16_autocast_forward_backward_is_close_to_fp32(name):
    model = build(name, drop_path_rate=0.)
    x = torch.randn(2, 3, *SIZE)
    reference = model(x)
    weights = [torch.randn_like(o) for o in reference]
    _loss(reference, weights).backward()
    fp32_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
        loss = _loss(outs, weights)
    loss.backward()

    assert {o.dtype for o in outs} == {torch.bfloat16}
    assert [o.shape for o in outs] == [r.shape for r in reference]
    for out, ref in zip(outs, reference):
        assert torch.isfinite(out).all()
        assert (out.float() - ref).norm() <= OUT_TOL * ref.norm()
    grads = dict(model.named_parameters())
    assert all(torch.isfinite(grads[n].grad).all() for n in fp32_grads)
    error = sum((grads[n].grad - g).square().sum() for n, g in fp32_grads.items()).sqrt()
    scale = sum(g.square().sum() for g in fp32_grads.values()).sqrt()
    assert error <= GRAD_TOL[name] * scale


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_models_cast_to_16_bits_run_in_that_dtype(name, dtype):
    model = build(name).to(dtype).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *SIZE, dtype=dtype))
    assert {o.dtype for o in outs} == {dtype}
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('mode', ['bilinear', 'area'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_gld_resamples_16_bit_maps(mode, dtype):
    """CPU's antialiased bilinear kernel has no 16-bit version: GLD resamples in fp32."""
    gld = GLD(dim=4, grid_size=(8, 8), resize_mode=mode)
    x = torch.randn(2, 5, 12, 4)
    expected = gld(x)
    out = gld.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


def test_output_dtype_on_torch_without_the_device_generic_autocast_api(monkeypatch):
    x = torch.zeros(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert base.output_dtype(x) == torch.bfloat16
        monkeypatch.delattr(torch, 'get_autocast_dtype')
        assert base.output_dtype(x) == torch.bfloat16
    assert base.output_dtype(x) == torch.float32
