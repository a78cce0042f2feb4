"""Window partitioning and the padding mask shared by the windowed attentions."""
import torch

from mmvit_plugins.models.layers import (
    pad_to_multiple,
    window_padding_mask,
    window_partition,
    window_reverse,
)


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
