"""FSLA (BOAT's feature-space local attention) against a straightforward implementation."""
import math
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.utils._python_dispatch import TorchDispatchMode

from mmvit_plugins.models.layers import fsla
from mmvit_plugins.models.layers.fsla import (
    FeatureSpaceLocalAttention,
    balanced_clustering,
    cluster_slots,
    group_layout,
    slot_features,
)
from mmvit_plugins.utils.op_count import dispatched_ops


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
    out = torch.zeros(b, n, c, dtype=x.dtype, device=x.device)
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


def _module(dim: int = 16, heads: int = 2, device: torch.device = torch.device('cpu'),
            **kwargs) -> FeatureSpaceLocalAttention:
    return FeatureSpaceLocalAttention(dim, heads, **kwargs).double().eval().to(device)


@pytest.mark.parametrize('hw', [(14, 14), (28, 28), (7, 7)])
def test_matches_reference_where_public_code_is_defined(hw, device):
    """Square maps with N = 49 * 2**k (and N = 49: one group, plain attention)."""
    module = _module(device=device)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(module(x, hw), _reference_fsla(module, x, hw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('hw', [(10, 13), (5, 10), (8, 8), (3, 5), (9, 31)])
def test_matches_reference_at_any_token_count(hw, device):
    """Padded layouts give the result of the real-tokens-only algorithm."""
    module = _module(qk_scale=1.0, device=device)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(module(x, hw), _reference_fsla(module, x, hw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('overlap,qkv_bias', [(0, True), (3, False), (8, True)])
def test_small_group_overlap_and_bias_options(overlap, qkv_bias, device):
    module = _module(heads=4, group_size=8, overlap=overlap, qkv_bias=qkv_bias, device=device)
    x = torch.randn(1, 6 * 7, 16, dtype=torch.float64, device=device)
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
def test_gradients_match_reference(hw, device):
    module = _module(heads=4, device=device)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64, device=device,
                    requires_grad=True)
    cotangent = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64, device=device)
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


def _previous_groups(x: torch.Tensor, num_tokens: torch.Tensor, group_size: int) -> torch.Tensor:
    """The clustering written with per-level padded groups: the groups the layouts must give.

    Row r of the (R, N_max, d) features holds ``num_tokens[r]`` tokens, all rows with the same
    number of levels. Returns (R, G, s): the token of every slot (s = the largest
    ``ceil(N / G)``), real tokens first in each group, padding = that row's N. Per level: padded
    groups, padding sorted last with an infinite key, each child filled with its real tokens
    and then padding.
    """
    rows, _, dim = x.shape
    num_levels = math.ceil(math.log2(num_tokens.max().item() / group_size))
    assert num_levels == math.ceil(math.log2(num_tokens.min().item() / group_size))
    slots = -(-num_tokens.max().item() >> num_levels) << num_levels
    token = torch.arange(slots).expand(rows, slots)
    feats = torch.where((token < num_tokens[:, None])[..., None],
                        F.pad(x, (0, 0, 0, slots - x.shape[1])), 0).view(rows, 1, slots, dim)
    order = token.view(rows, 1, slots)
    counts = num_tokens.view(rows, 1)
    for _ in range(num_levels):
        groups, n = counts.shape[1], slots // counts.shape[1]
        first, second = (counts + 1) // 2, counts // 2
        pos = torch.arange(n)
        real, in_first = pos < counts[..., None], pos < first[..., None]
        sums = torch.stack([in_first, real & ~in_first], 2).to(x.dtype) @ feats
        unit = F.normalize(feats, dim=-1).transpose(-1, -2)
        for _ in range(2):
            sums = (100 * F.normalize(sums, dim=-1) @ unit).softmax(dim=-2) @ feats
        scores = F.normalize(sums, dim=-1) @ unit + 1
        key = (scores[..., 0, :] / scores[..., 1, :]).masked_fill(~real, float('inf'))
        j = torch.arange(n // 2)
        c, f, s = counts[..., None], first[..., None], second[..., None]
        child0 = torch.where(j < f, j, c + j - f)
        child1 = torch.where(j < s, f + j, c + n // 2 - f + j - s)
        within = key.argsort(-1).gather(-1, torch.cat([child0, child1], -1))
        feats = feats.gather(2, within[..., None].expand(-1, -1, -1, dim))
        feats = feats.view(rows, 2 * groups, n // 2, dim)
        order = order.gather(2, within).view(rows, 2 * groups, n // 2)
        counts = torch.stack([first, second], 2).view(rows, -1)
    return torch.minimum(order, num_tokens.view(rows, 1, 1))


def _grouped_reference(module: FeatureSpaceLocalAttention, x: torch.Tensor,
                       hw: Tuple[int, int]) -> torch.Tensor:
    """FSLA on the groups of :func:`_previous_groups`, attention batched over padded groups."""
    b, n, c = x.shape
    heads, d = module.num_heads, c // module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).view(b, n, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, d)
    order = _previous_groups(q, torch.full((b * heads,), n), module.group_size)  # (R, G, s)
    rows, groups, slots = order.shape
    overlap = min(module.overlap, slots)
    counts = (order < n).sum(-1)
    sibling = torch.arange(groups) ^ 1
    start = torch.where(torch.arange(groups) % 2 == 0, 0,
                        (counts[:, sibling] - overlap).clamp(min=0))
    pos = start[..., None] + torch.arange(overlap)
    borrowed = order[:, sibling].gather(-1, pos.clamp(max=slots - 1))
    borrowed = borrowed.masked_fill(pos >= counts[:, sibling, None], n)
    keys = torch.cat([order, borrowed], -1)

    def pick(t: torch.Tensor, token: torch.Tensor) -> torch.Tensor:  # (R, n, d) at (R, G, j)
        index = token.clamp(max=n - 1).flatten(1)[..., None].expand(-1, -1, d)
        return t.gather(1, index).view(*token.shape, d)

    logits = pick(q, order) @ pick(k, keys).transpose(-1, -2) * module.scale
    attn = logits.masked_fill((keys >= n)[:, :, None], float('-inf')).softmax(-1)
    out = torch.zeros(rows, n + 1, d, dtype=x.dtype)
    out.scatter_(1, order.flatten(1)[..., None].expand(-1, -1, d),
                 (attn @ pick(v, keys)).flatten(1, 2))
    out = out[:, :n].view(b, heads, n, d).transpose(1, 2).reshape(b, n, c)
    v_map = qkv[:, :, 2].reshape(b, n, c).transpose(1, 2).reshape(b, c, *hw)
    return module.proj(out + module.lepe(v_map).flatten(2).transpose(1, 2))


def test_previous_groups_reference_matches_spec():
    """The batched reference below equals the per-group spec implementation."""
    x = torch.randn(3, 9 * 31, 8, dtype=torch.float64)
    num_tokens = torch.tensor([9 * 31, 8 * 31, 7 * 31])  # 3 levels each
    order = _previous_groups(x, num_tokens, 49)
    for row, n in enumerate(num_tokens.tolist()):
        for slots, tokens in zip(order[row].tolist(), _reference_groups(x[row, :n], 49)):
            assert slots[:len(tokens)] == tokens and set(slots[len(tokens):]) <= {n}


def _swept_token_counts(limit: int = 5000, sample: int = 96) -> List[int]:
    """Token counts from 50 to ``limit``: every level boundary ``49 * 2**k + {-1, 0, 1, 2}``
    (the last count of k levels and the first of k + 1, where the layout's slot and padding
    counts change) plus a seeded sample of the counts in between."""
    boundaries = {49 * 2**k + d for k in range(8) for d in (-1, 0, 1, 2)}
    generator = torch.Generator().manual_seed(29)
    sampled = (torch.randperm(limit - 49, generator=generator)[:sample] + 50).tolist()
    return sorted(n for n in boundaries | set(sampled) if 50 <= n <= limit)


def test_clustering_equals_previous_at_level_boundaries_and_sampled_counts():
    """Static and tight layouts give the previous groups in float64 for the token counts of
    :func:`_swept_token_counts`."""
    torch.manual_seed(0)
    counts = _swept_token_counts()
    by_levels = {}
    for n in counts:
        by_levels.setdefault(math.ceil(math.log2(n / 49)), []).append(n)
    assert sorted(by_levels) == list(range(1, 8))
    for sizes in by_levels.values():
        # the reference takes token counts with the same number of levels at once
        sizes = torch.tensor(sizes)
        x = torch.randn(len(sizes), int(sizes[-1]), 3, dtype=torch.float64)
        reference = _previous_groups(x, sizes, 49)
        for row, num_tokens in enumerate(sizes.tolist()):
            for static in (True, False):
                layout = group_layout(num_tokens, 49, 20, static_shapes=static)
                order = balanced_clustering(x[row, :num_tokens], layout)
                order = order.view(layout.num_groups, -1)
                # both sides: the real tokens, then padding (= N) up to their slot count
                slots = min(order.shape[-1], reference.shape[-1])
                assert torch.equal(order[:, :slots], reference[row, :, :slots]), num_tokens
                assert (order[:, slots:] == num_tokens).all(), (num_tokens, static)
                assert (reference[row, :, slots:] == num_tokens).all(), num_tokens
    group_layout.cache_clear()


@pytest.mark.parametrize('static', [True, False])
@pytest.mark.parametrize('hw', [(200, 304), (100, 152), (50, 76), (25, 38)])
def test_stage_sizes_of_800x1216_equal_previous(hw, static):
    """The four stage sizes of an 800x1216 input, batch 1-3, overlap 0 and 20, float64."""
    torch.manual_seed(0)
    x = torch.randn(3, hw[0] * hw[1], 8, dtype=torch.float64)
    for overlap in (0, 20):
        module = _module(dim=8, heads=1, overlap=overlap, static_shapes=static)
        reference = _grouped_reference(module, x, hw)
        for batch in (1, 2, 3):
            torch.testing.assert_close(module(x[:batch], hw), reference[:batch], atol=1e-10,
                                       rtol=0, msg=f'{hw} overlap {overlap} batch {batch}')
    group_layout.cache_clear()


class _ShapeLog(TorchDispatchMode):
    """The operators a piece of code dispatches, with the shapes of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func._schema.name, shapes))
        return func(*args, **(kwargs or {}))


def test_clustering_shapes_depend_only_on_the_number_of_groups():
    """Every N with G groups: layout data of the same shapes and the same operators on the same
    shapes, so one captured or compiled graph of ``cluster_slots`` serves them all."""
    logs, layouts = [], []
    for num_tokens in (785, 1000, 1567, 1568):  # 16 * 49 < N <= 32 * 49: G = 32
        layout = group_layout(num_tokens, 49, 20)
        x = torch.randn(6, num_tokens, 8)
        cluster_slots(*slot_features(x, layout), layout.child_slots, layout.shape)  # warm caches
        feats = slot_features(x, layout)
        with _ShapeLog() as log:
            cluster_slots(*feats, layout.child_slots, layout.shape)
        logs.append(log.calls)
        layouts.append(layout)
    assert all(log == logs[0] for log in logs)
    assert len({(lay.shape, lay.child_slots.shape, lay.slot_meta.shape) for lay in layouts}) == 1
    assert layouts[0].shape == (32, 49, 32 * 49, 5)


def test_clustering_dispatches_21_operators_per_level():
    """The operator count of the clustering: 7 per call, 21 per level, one fewer at the last
    (it was 5 per call and 30 per level; 20 before it was written without ``out=`` buffers,
    which dynamo and the ONNX exporter cannot capture)."""
    counts = {}
    for num_tokens in (98, 196, 392, 784, 1568):
        layout = group_layout(num_tokens, 49, 20)
        x = torch.randn(2, num_tokens, 8)
        def run(x=x, layout=layout):
            return balanced_clustering(x, layout)

        run()
        counts[layout.shape.num_levels] = sum(dispatched_ops(run).values())
    assert counts == {k: 6 + 21 * k for k in range(1, 6)}


def test_fsla_forward_dispatches_12_operators_besides_the_clustering():
    """11 before graph capture: the output rows were added into a preallocated (``out=``)
    buffer, which dynamo cannot capture; they are now gathered in the order of SDPA's output."""
    module = FeatureSpaceLocalAttention(16, 2).eval()
    x = torch.randn(2, 14 * 28, 16)
    with torch.no_grad():
        module(x, (14, 28))
        ops = dispatched_ops(lambda: module(x, (14, 28)))
    assert sum(ops.values()) == 12 + 6 + 21 * 3
    assert ops['aten::_scaled_dot_product_flash_attention_for_cpu'] == 1


def _spy_clustering(monkeypatch, replay: Optional[list] = None) -> list:
    """Record (queries, layout, order) of every clustering FSLA runs; with ``replay``, return
    the orders recorded there instead (the same groups in another dtype)."""
    calls = []

    def spy(x, layout, *args):
        order = balanced_clustering(x, layout, *args)
        calls.append((x.detach().clone(), layout, order))
        return order if replay is None else replay[len(calls) - 1][2]

    monkeypatch.setattr(fsla, 'balanced_clustering', spy)
    return calls


@pytest.mark.parametrize('dtype', ['autocast', torch.bfloat16, torch.float16])
def test_clustering_runs_in_float32_whatever_the_compute_dtype(monkeypatch, dtype):
    """Under bf16 autocast and with fp16/bf16 parameters the groups are those of the float32
    clustering of the (rounded) queries; bf16 arithmetic would give other groups."""
    calls = _spy_clustering(monkeypatch)
    module = FeatureSpaceLocalAttention(32, 2)
    x = torch.randn(2, 24 * 24, 32)
    if dtype == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            module(x, (24, 24))
        dtype = torch.bfloat16
    else:
        module.to(dtype)(x.to(dtype), (24, 24))
    (queries, layout, order), = calls
    assert queries.dtype == dtype
    assert torch.equal(order, balanced_clustering(queries.float(), layout))
    with torch.autocast('cpu', dtype=torch.bfloat16):  # what the clustering must not do
        raw, scored = slot_features(queries, layout)
        low = cluster_slots(raw.bfloat16(), scored.bfloat16(), layout.child_slots, layout.shape)
    assert not torch.equal(order, low.view(order.shape))


def _forward_backward(module: FeatureSpaceLocalAttention, x: torch.Tensor,
                      hw: Tuple[int, int], cotangent: torch.Tensor, amp: bool = False):
    """Output and gradients (input first, then parameters) of ``(out * cotangent).sum()``."""
    x = x.detach().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        out = module(x, hw)
    grads = torch.autograd.grad((out.float() * cotangent).sum(), [x, *module.parameters()])
    return out, dict(zip(['x', *dict(module.named_parameters())], grads))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_autocast_forward_and_backward_are_close_to_fp32(monkeypatch):
    """bf16 autocast: bf16 outputs, finite gradients; on the groups of the fp32 run, outputs
    within 1 % and input/parameter gradients within 3 % (relative norm) of fp32. (Its own
    groups are the fp32 clustering of bf16-rounded queries, test above; the hierarchical split
    is discrete, so they differ from fp32 where keys nearly tie.)"""
    module = FeatureSpaceLocalAttention(32, 2)
    x, hw = torch.randn(2, 14 * 27, 32), (14, 27)  # G = 8 groups, with padding
    cotangent = torch.randn(2, 14 * 27, 32)
    fp32 = _spy_clustering(monkeypatch)
    out32, grads32 = _forward_backward(module, x, hw, cotangent)
    out, grads = _forward_backward(module, x, hw, cotangent, amp=True)
    assert out.dtype == torch.bfloat16
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    _spy_clustering(monkeypatch, replay=fp32)
    out, grads = _forward_backward(module, x, hw, cotangent, amp=True)
    assert _relative(out, out32) < 0.01
    for name, grad in grads.items():
        assert _relative(grad, grads32[name]) < 0.015, name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_parameters(monkeypatch, dtype):
    """fp16 and bf16 modules on CPU: forward and backward finite and in their dtype; on the fp32
    groups: outputs within 0.3 % (fp16) / 1 % (bf16) of fp32, gradients within 1.5x that
    (measured: 0.05 / 0.08 %, 0.45 / 0.5 %). The padding mask is finite in every dtype
    (no -inf arithmetic that could make a NaN)."""
    module = FeatureSpaceLocalAttention(32, 2)
    x, hw = torch.randn(2, 14 * 27, 32), (14, 27)
    cotangent = torch.randn(2, 14 * 27, 32)
    fp32 = _spy_clustering(monkeypatch)
    out32, grads32 = _forward_backward(module, x, hw, cotangent)
    _spy_clustering(monkeypatch, replay=fp32)
    module.to(dtype)
    out, grads = _forward_backward(module, x.to(dtype), hw, cotangent)
    tolerance = 0.003 if dtype == torch.float16 else 0.01
    assert out.dtype == dtype and _relative(out, out32) < tolerance
    for name, grad in grads.items():
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        assert _relative(grad, grads32[name]) < 1.5 * tolerance, name
    mask = fsla._attention_mask(14 * 27, 49, 20, torch.device('cpu'), dtype)
    assert mask.dtype == dtype and torch.isfinite(mask).all()
    assert mask.min() == torch.finfo(dtype).min


@pytest.mark.parametrize('name,arch,budget', [
    ('BOATSwin', dict(embed_dims=24, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), 720),
    ('BOATCSWin', dict(embed_dims=16, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16),
                       split_sizes=(1, 2, 7, 7)), 1500)])
def test_backbone_forward_operator_budget(name, arch, budget):
    """The tiny presets' depths and heads (narrower: the count does not depend on widths) at
    224x224, batch 1: 638 and 1469 operators per forward (666 and 1405 before the layouts and
    masks became capturable, 867 and 1824 before that)."""
    model = MODELS.build(dict(type=name, arch=arch)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
        assert sum(dispatched_ops(lambda: model(x)).values()) <= budget
