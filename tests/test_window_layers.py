"""Window partitioning, the padding mask and the window attention shared by the backbones."""
from math import inf

import pytest
import torch

from mmvit_plugins.models.layers import (
    WindowMSA,
    attend_in_windows,
    pad_to_multiple,
    window_attention_mask,
    window_count,
    window_extent,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from mmvit_plugins.utils.op_count import dispatched_ops


def test_padding_mask_marks_exactly_the_padded_tokens():
    h, w, window = 5, 7, (4, 3)
    real = torch.ones(1, h, w, 1)
    expected = window_partition(pad_to_multiple(real, window), window).squeeze(-1) == 0
    mask = window_padding_mask((h, w), window, torch.device('cpu'))
    assert mask.dtype == torch.bool and mask.shape == (2 * 3, 12)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == 8 * 9 - h * w
    assert window_padding_mask((8, 9), window, torch.device('cpu')) is None


def test_partition_and_reverse_are_inverse():
    x = torch.randn(2, 8, 6, 5)
    assert torch.equal(window_reverse(window_partition(x, (4, 3)), (4, 3), 8, 6), x)


def test_a_none_side_is_the_whole_extent():
    """CSWin's stripes: ``(None, 3)`` pads and splits only the width; the same windows, masks
    and padding as the window (H, 3) of the map's height."""
    x = torch.randn(2, 5, 7, 4)
    for window, same in (((None, 3), (5, 3)), ((2, None), (2, 7))):
        padded = pad_to_multiple(x, window)
        assert torch.equal(padded, pad_to_multiple(x, same))
        assert window_extent(window, padded.shape[1:3]) == same
        assert window_count(window, padded.shape[1:3]) == window_count(same, padded.shape[1:3])
        windows = window_partition(padded, window)
        assert torch.equal(windows, window_partition(padded, same))
        assert torch.equal(window_reverse(windows, window, *padded.shape[1:3]), padded)
        mask = window_padding_mask((5, 7), window, torch.device('cpu'))
        assert torch.equal(mask, window_padding_mask((5, 7), same, torch.device('cpu')))
    assert window_padding_mask((5, 6), (None, 3), torch.device('cpu')) is None


def _window_inputs(images: int, masked: bool):
    """Tokens of ``images`` images of 4 windows of 3x3 and, if ``masked``, a (4, 9, 9) mask."""
    x = torch.randn(images * 4, 9, 16)
    mask = None
    if masked:
        mask = torch.zeros(4, 9, 9)
        mask[1:, :, 4:] = -100.
        mask[3, 5:, :] = -100.
    return x, mask


@pytest.mark.parametrize('images', [1, 2])
@pytest.mark.parametrize('masked', [False, True])
def test_window_msa_equals_explicit_attention(images, masked):
    attn = WindowMSA(16, 2, 3).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x, mask = _window_inputs(images, masked)
    q, k, v = attn.qkv(x).view(x.shape[0], 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * attn.scale + attn.relative_position_bias()
    if masked:
        logits = logits + mask.repeat(images, 1, 1)[:, None]
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('images', [1, 2])
@pytest.mark.parametrize('masked', [False, True])
def test_window_msa_inference_takes_the_fused_cpu_kernel(images, masked):
    """A relative position bias with a strided last dim sent SDPA to its unfused math path,
    which made BOAT-Swin-T 17 % slower at 224x224 batch 1."""
    attn = WindowMSA(16, 2, 3).eval()
    x, mask = _window_inputs(images, masked)
    with torch.no_grad():
        ops = dispatched_ops(lambda: attn(x, mask))
    assert ops['aten::_scaled_dot_product_flash_attention_for_cpu'] == 1
    assert 'aten::_softmax' not in ops


def test_attention_mask_hides_padding_and_other_regions():
    cpu = torch.device('cpu')
    assert window_attention_mask((14, 14), 7, 0, cpu) is None
    plain = window_attention_mask((10, 12), 7, 0, cpu)
    assert plain.shape == (4, 49, 49)
    # window 0 of the unshifted map: rows/cols 0-6, all real; window 3 holds padding
    assert (plain[0] == 0).all()
    real = torch.ones(14, 14, dtype=torch.bool)
    real[10:] = False
    real[:, 12:] = False
    real3 = real[7:, 7:].flatten()
    assert (plain[3][real3][:, ~real3] == -inf).all() and (plain[3][real3][:, real3] == 0).all()
    assert (plain[3][~real3][:, real3] == -inf).all() and (plain[3][~real3][:, ~real3] == 0).all()
    # shifted: real tokens of different regions are kept apart with Swin's -100
    shifted = window_attention_mask((14, 14), 7, 3, cpu)
    assert shifted.shape == (4, 49, 49) and set(shifted.unique().tolist()) == {0., -100.}
    assert window_attention_mask((10, 12), 7, 3, cpu).shape == (4, 49, 49)
    # every token sees itself: no softmax row is fully masked
    assert (window_attention_mask((10, 12), 7, 3, cpu).diagonal(dim1=1, dim2=2) == 0).all()
    # stripes (CSWin): a (5, 3) window over a 5x7 map pads one column of the last stripe
    stripes = window_attention_mask((5, 7), (5, 3), 0, cpu)
    assert stripes.shape == (3, 15, 15) and (stripes[:2] == 0).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_masked_window_attention_is_finite_in_every_dtype(dtype):
    """-inf masks added to a bias and cast to 16 bits never give NaN: no row is fully masked."""
    attn = WindowMSA(16, 2, 7).eval()
    x = torch.randn(2, 10, 12, 16)
    mask = window_attention_mask((10, 12), 7, 3, x.device)
    expected = attend_in_windows(attn, x, 7, 3, mask)
    with torch.no_grad():
        if dtype == torch.float16:  # CPU has no fp16 matmul for every op: check the mask math
            out = torch.softmax((torch.zeros(4, 49, 49) + mask).to(dtype), -1)
            assert torch.isfinite(out).all()
            return
        out = attend_in_windows(attn.to(dtype), x.to(dtype), 7, 3, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize('shift', [0, 2])
def test_attend_in_windows_never_sees_the_padding(shift):
    """Real tokens of a padded map get the same result whatever the padding holds."""
    attn = WindowMSA(8, 2, 4).eval()
    x = torch.randn(2, 6, 9, 8)
    mask = window_attention_mask((6, 9), 4, shift, x.device)
    with torch.no_grad():
        reference = attend_in_windows(attn, x, 4, shift, mask)
        padded = torch.full((2, 8, 12, 8), 7.)
        padded[:, :6, :9] = x
        shifted = torch.roll(padded, (-shift, -shift), (1, 2))
        windows = attn(window_partition(shifted, 4), mask)
        out = torch.roll(window_reverse(windows, 4, 8, 12), (shift, shift), (1, 2))[:, :6, :9]
    torch.testing.assert_close(out, reference)
