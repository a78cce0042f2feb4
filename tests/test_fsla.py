"""FSLA (BOAT's feature-space local attention) against a straightforward implementation."""
import math
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

from mmvit_plugins.models.layers.fsla import (
    FeatureSpaceLocalAttention,
    balanced_clustering,
    group_layout,
)


def _split(feats: torch.Tensor, tokens: List[int]) -> Tuple[List[int], List[int]]:
    """One balanced 2-means split of a group, the spec's steps on the group's real tokens."""
    x = feats[tokens]
    first = (len(tokens) + 1) // 2
    centroids = F.normalize(torch.stack([x[:first].mean(0), x[first:].mean(0)], 1), dim=0)
    normed = F.normalize(x, dim=1)
    for _ in range(2):
        assign = torch.softmax(100 * normed @ centroids, dim=1)
        centroids = F.normalize(x.t() @ assign, dim=0)
    scores = normed @ centroids
    key = (scores[:, 0] + 1) / (scores[:, 1] + 1)
    ordered = [tokens[i] for i in torch.argsort(key).tolist()]
    return ordered[:first], ordered[first:]


def _reference_groups(feats: torch.Tensor, group_size: int) -> List[List[int]]:
    groups = [list(range(feats.shape[0]))]
    for _ in range(math.ceil(math.log2(feats.shape[0] / group_size))):
        groups = [child for group in groups for child in _split(feats, group)]
    return groups


def _reference_fsla(module: FeatureSpaceLocalAttention, x: torch.Tensor,
                    hw: Tuple[int, int]) -> torch.Tensor:
    """Per image, per head, per group; lists of real tokens only, no padding."""
    b, n, c = x.shape
    heads, m, ov = module.num_heads, module.group_size, module.overlap
    d = c // heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias)
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for i in range(b):
        for j in range(heads):
            q, k, v = (qkv[i, :, t * c + j * d:t * c + (j + 1) * d] for t in range(3))
            groups = [list(range(n))] if n <= m else _reference_groups(q, m)
            for g, tokens in enumerate(groups):
                keys = list(tokens)
                if len(groups) > 1:
                    sibling = groups[g ^ 1]
                    keys += sibling[:ov] if g % 2 == 0 else sibling[max(len(sibling) - ov, 0):]
                attn = torch.softmax(q[tokens] @ k[keys].t() * module.scale, dim=-1)
                out[i, tokens, j * d:(j + 1) * d] = attn @ v[keys]
    v_map = qkv[..., 2 * c:].transpose(1, 2).reshape(b, c, *hw)
    out = out + module.lepe(v_map).flatten(2).transpose(1, 2)
    return module.proj(out)


def _module(dim: int = 16, heads: int = 2, **kwargs) -> FeatureSpaceLocalAttention:
    return FeatureSpaceLocalAttention(dim, heads, **kwargs).double().eval()


@pytest.mark.parametrize('hw', [(14, 14), (28, 28), (7, 7)])
def test_matches_reference_where_public_code_is_defined(hw):
    """Square maps with N = 49 * 2**k (and N = 49: one group, plain attention)."""
    module = _module()
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    torch.testing.assert_close(module(x, hw), _reference_fsla(module, x, hw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('hw', [(10, 13), (5, 10), (8, 8), (3, 5), (9, 31)])
def test_matches_reference_at_any_token_count(hw):
    """Padded layouts give the result of the real-tokens-only algorithm."""
    module = _module(qk_scale=1.0)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    torch.testing.assert_close(module(x, hw), _reference_fsla(module, x, hw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('overlap,qkv_bias', [(0, True), (3, False), (8, True)])
def test_small_group_overlap_and_bias_options(overlap, qkv_bias):
    module = _module(heads=4, group_size=8, overlap=overlap, qkv_bias=qkv_bias)
    x = torch.randn(1, 6 * 7, 16, dtype=torch.float64)
    torch.testing.assert_close(module(x, (6, 7)), _reference_fsla(module, x, (6, 7)),
                               atol=1e-5, rtol=0)


def test_clustering_matches_reference_groups():
    x = torch.randn(3, 400, 8, dtype=torch.float64)
    layout = group_layout(400, 49, 20)
    order = balanced_clustering(x, layout).view(3, 16, -1)
    for row in range(3):
        groups = _reference_groups(x[row], 49)
        assert len(groups) == order.shape[1] == 16
        for slots, tokens in zip(order[row].tolist(), groups):
            assert slots[:len(tokens)] == tokens
            assert all(t >= 400 for t in slots[len(tokens):])


@pytest.mark.parametrize('num_tokens', [49 * 8, 400])
def test_clustering_takes_strided_inputs(num_tokens):
    """The queries of every image and head, read in place from a (B, N, heads, 3, d) tensor."""
    qkv = torch.randn(2, num_tokens, 3, 3, 8, dtype=torch.float64)
    layout = group_layout(num_tokens, 49, 20)
    queries = qkv[..., 0, :].transpose(1, 2)
    assert not queries.is_contiguous()
    assert torch.equal(balanced_clustering(queries, layout),
                       balanced_clustering(queries.reshape(6, num_tokens, 8), layout))


@pytest.mark.parametrize('hw', [(14, 14), (9, 31)])
def test_gradients_match_reference(hw):
    module = _module(heads=4)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    grads = []
    for forward in (module, lambda *args: _reference_fsla(module, *args)):
        inputs = [x, *module.parameters()]
        grads.append(torch.autograd.grad(forward(x, hw), inputs, cotangent))
    for name, ours, reference in zip(['x', *dict(module.named_parameters())], *grads):
        torch.testing.assert_close(ours, reference, atol=1e-8, rtol=1e-6, msg=name)


@pytest.mark.parametrize('num_tokens', [50, 97, 130, 3800, 49 * 64])
def test_layout_is_balanced(num_tokens):
    layout = group_layout(num_tokens, 49, 20)
    groups = layout.num_slots // layout.slot_size
    assert groups & (groups - 1) == 0 and layout.slot_size <= 49
    assert num_tokens <= layout.num_slots < num_tokens + groups
    if layout.key_padding is None:
        assert layout.num_slots == num_tokens
        return
    per_group = (~layout.key_padding[:, 0, :layout.slot_size]).sum(1)
    assert per_group.sum() == num_tokens
    assert per_group.max() - per_group.min() <= 1
    assert per_group.min() > 49 // 2 - 1


def test_images_of_a_batch_are_independent():
    module = _module()
    x = torch.randn(3, 10 * 13, 16, dtype=torch.float64)
    batched = module(x, (10, 13))
    for i in range(3):
        torch.testing.assert_close(module(x[i:i + 1], (10, 13)), batched[i:i + 1],
                                   atol=1e-10, rtol=0)


def test_backward_reaches_inputs_and_weights():
    module = FeatureSpaceLocalAttention(16, 2)
    x = torch.randn(2, 9 * 11, 16, requires_grad=True)
    module(x, (9, 11)).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize('kwargs', [dict(group_size=1), dict(overlap=50), dict(overlap=-1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FeatureSpaceLocalAttention(16, 2, **kwargs)
