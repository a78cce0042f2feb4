"""Window partitioning, the padding mask and the window attention shared by the backbones."""
import pytest
import torch

from mmvit_plugins.models.layers import (
    WindowMSA,
    pad_to_multiple,
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
