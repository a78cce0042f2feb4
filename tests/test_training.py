"""Training as users train on GPUs, checked on CPU: DDP without unused-parameter detection for
any out_indices / frozen_stages (one 2-process gloo launch for every configuration, the
SyncBatchNorm refiner folded in), activation checkpointing that leaves BatchNorm statistics
alone, the refiner's BatchNorm types, and the deterministic position-embedding resize."""
import json
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from mmengine.model.utils import _BatchNormXd
from torch import nn

from mmvit_plugins.models import backbones
from mmvit_plugins.models.backbones.refiner_vit import DistributedLocalAttention, RefinerViT
from mmvit_plugins.models.layers import bicubic_weights, resize_abs_pos_embed
from tests.conftest import TINY_BACKBONES

NAMES = sorted(backbones.__all__)
LARGEST_FROZEN = {'BOATSwin': 4, 'BOATCSWin': 4, 'MAFormer': 4,
                  'RefinerViT': TINY_BACKBONES['RefinerViT']['arch']['num_layers']}
WORLD_SIZE = 2


def ddp_configs() -> List[Tuple[str, dict]]:
    """Every family with out_indices (0, 1, 2), (1, 2, 3), (3,) and frozen_stages 1 and the
    largest."""
    configs = []
    for name in NAMES:
        for out_indices in ((0, 1, 2), (1, 2, 3), (3, )):
            configs.append((name, dict(out_indices=out_indices)))
        for frozen in (1, LARGEST_FROZEN[name]):
            configs.append((name, dict(frozen_stages=frozen)))
    return configs


class _Detector(nn.Module):
    """A backbone and a 1x1 conv head per output: the smallest model DDP trains end to end."""

    def __init__(self, name: str, **kwargs):
        super().__init__()
        self.backbone = getattr(backbones, name)(**{**TINY_BACKBONES[name], **kwargs})
        self.heads = nn.ModuleList(nn.Conv2d(self.backbone.num_features[i], 2, 1)
                                   for i in self.backbone.out_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(head(out).square().mean() for head, out in zip(self.heads, self.backbone(x)))


def _train_ddp(name: str, kwargs: dict, rank: int) -> Dict[str, object]:
    """Two SGD iterations under DDP (find_unused_parameters=False) on rank-specific images:
    the trainable parameters without a gradient, the frozen ones that moved, and a checksum of
    the weights (equal on every rank when DDP reduced every gradient)."""
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    model = _Detector(name, **kwargs).train()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        optimizer.zero_grad()
        ddp(torch.randn(2, 3, 64, 64, generator=g)).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    return dict(
        trainable=sum(p.requires_grad for p in params.values()),
        without_grad=sorted(k for k, p in params.items() if p.requires_grad and p.grad is None),
        frozen_moved=sorted(k for k, p in params.items()
                            if not p.requires_grad and not torch.equal(p, initial[k])),
        checksum=float(sum(p.double().sum() for p in params.values())))


# -- the refiner with SyncBatchNorm on 2 processes against BatchNorm on the whole batch -------
def random_refiner(heads: int, kernel: int = 3) -> Tuple[DistributedLocalAttention,
                                                          nn.BatchNorm2d]:
    """A float64 refiner and its adapt_bn with random weights and running statistics."""
    g = torch.Generator().manual_seed(2)
    dla, adapt_bn = DistributedLocalAttention(heads, 3, kernel), nn.BatchNorm2d(heads)
    for conv in (dla.conv_exp, dla.depth_sep_conv, dla.conv_pro):
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * conv.weight[0].numel()**-.5
    for bn in [m for m in dla.modules() if isinstance(m, nn.BatchNorm2d)] + [adapt_bn]:
        c = bn.num_features
        bn.weight.data = 1 + 0.3 * torch.randn(c, generator=g)
        bn.bias.data = 0.3 * torch.randn(c, generator=g)
        bn.running_mean.data = 0.2 * torch.randn(c, generator=g)
        bn.running_var.data = 0.5 + torch.rand(c, generator=g)
    return dla.double(), adapt_bn.double()


def refiner_inputs(batch: int, heads: int, n: int) -> Tuple[torch.Tensor, ...]:
    """Maps (batch, heads, n, n), an output gradient and a padding mask (two padded tokens in
    the first map, one in the last)."""
    g = torch.Generator().manual_seed(3)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[0, -2:] = False
    valid[-1, 1] = False
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    attn = (torch.rand(batch, heads, n, n, generator=g, dtype=torch.float64) * 4).softmax(-1)
    grad = torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64)
    return attn * mask, grad.masked_fill(~mask, 0.), mask


def refine_step(dla: DistributedLocalAttention, adapt_bn: nn.Module, attn: torch.Tensor,
                grad: torch.Tensor, mask: torch.Tensor) -> Dict[str, object]:
    """One training refine + backward: output, map gradient, parameter gradients, buffers and
    the bytes autograd keeps for the backward (saved tensors, a tensor once per storage)."""
    attn = attn.clone().requires_grad_()
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dla.refine(attn, adapt_bn, 0.125, mask)
    (out * grad).sum().backward()
    return dict(out=out.detach(), attn_grad=attn.grad,
                grads=[p.grad for p in [*dla.parameters(), *adapt_bn.parameters()]],
                buffers=[b.clone() for b in [*dla.buffers(), *adapt_bn.buffers()]],
                saved_bytes=sum(saved.values()))


def _sync_batchnorm_check(rank: int) -> Dict[str, object]:
    """The refiner with SyncBatchNorm layers on this rank's half of a batch of 4 maps equals
    the BatchNorm refiner on the whole batch (float64): output, map gradient, parameter
    gradients summed over the ranks, running statistics; and the bytes it keeps, against the
    map's."""
    heads, n = 4, 9
    attn, grad, mask = refiner_inputs(2 * WORLD_SIZE, heads, n)
    ref = refine_step(*random_refiner(heads), attn, grad, mask)
    dla, adapt_bn = random_refiner(heads)
    dla = nn.SyncBatchNorm.convert_sync_batchnorm(dla)
    adapt_bn = nn.SyncBatchNorm.convert_sync_batchnorm(adapt_bn)
    part = slice(2 * rank, 2 * rank + 2)
    got = refine_step(dla, adapt_bn, attn[part], grad[part], mask[part])
    for g in got['grads']:
        dist.all_reduce(g)
    # each within 1e-10 of the largest value of its reference (parameters: of all of them)
    grad_scale = max(float(r.abs().max()) for r in ref['grads'])
    checks = [('out', got['out'], ref['out'][part], float(ref['out'].abs().max())),
              ('attn_grad', got['attn_grad'], ref['attn_grad'][part],
               float(ref['attn_grad'].abs().max()))]
    checks += [(f'grad{i}', g, r, grad_scale)
               for i, (g, r) in enumerate(zip(got['grads'], ref['grads']))]
    checks += [(f'buffer{i}', b, r, float(r.abs().max()))
               for i, (b, r) in enumerate(zip(got['buffers'], ref['buffers']))]
    errors = []
    for what, value, expected, scale in checks:
        if not torch.allclose(value.double(), expected.double(), rtol=1e-10, atol=1e-10 * scale):
            errors.append(f'{what}: max difference '
                          f'{float((value.double() - expected.double()).abs().max()):.3g}')
    return dict(errors=errors, saved_bytes=got['saved_bytes'],
                map_bytes=attn[part].numel() * attn.element_size())


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group('gloo', store=dist.FileStore(store_path, WORLD_SIZE), rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    results = {}
    try:
        for name, kwargs in ddp_configs():
            key = f'{name} {kwargs}'
            try:
                results[key] = _train_ddp(name, kwargs, rank)
            except RuntimeError as err:  # DDP's unused-parameter error, at iteration 2
                results[key] = dict(error=str(err).splitlines()[0])
        try:
            results['sync_bn'] = _sync_batchnorm_check(rank)
        except (RuntimeError, ValueError) as err:
            results['sync_bn'] = dict(errors=[f'{type(err).__name__}: {err}'])
    finally:
        Path(out_dir, f'rank{rank}.json').write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()


def test_two_process_training_of_every_family_and_sync_batchnorm(tmp_path):
    """One 2-process gloo launch (rendezvous through a file: no port to race for), in it:

    - every family trains two iterations under DDP with ``find_unused_parameters=False`` for
      out_indices (0, 1, 2), (1, 2, 3), (3,) and frozen_stages 1 and the largest: every
      parameter that requires grad has a gradient, frozen ones do not move, the ranks end with
      the same weights;
    - the refiner with SyncBatchNorm layers on half the batch per process equals BatchNorm on
      the whole batch (float64), keeping at most two maps' worth of tensors for its backward
      (the module-by-module formulation keeps ~15).
    """
    mp.start_processes(_worker, args=(str(tmp_path / 'store'), str(tmp_path)),
                       nprocs=WORLD_SIZE, join=True, start_method='spawn')
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(WORLD_SIZE)]
    failures = []
    for name, kwargs in ddp_configs():
        key = f'{name} {kwargs}'
        results = [r[key] for r in ranks]
        if 'error' in results[0]:
            failures.append(f'{key}: {results[0]["error"]}')
            continue
        if results[0]['without_grad'] or results[0]['frozen_moved'] or \
                not results[0]['trainable']:
            failures.append(f'{key}: {results[0]}')
        if abs(results[0]['checksum'] - results[1]['checksum']) > 1e-9 * abs(
                results[0]['checksum']):
            failures.append(f'{key}: the ranks differ: {[r["checksum"] for r in results]}')
    assert not failures, '\n'.join(failures)
    for rank in ranks:
        sync = rank['sync_bn']
        assert not sync['errors'], sync['errors']
        assert sync['saved_bytes'] <= 2 * sync['map_bytes'], sync


def test_ddp_configurations_cover_every_family():
    configs = ddp_configs()
    assert {name for name, _ in configs} == set(TINY_BACKBONES)
    assert len(configs) == 5 * len(NAMES)


@pytest.mark.parametrize('name,out_indices,unbuilt', [
    ('BOATSwin', (0, 1, 2), ('stages.3.', 'stages.2.downsample.', 'out_norm3.')),
    ('BOATCSWin', (1, ), ('stages.2.', 'stages.3.', 'stages.1.downsample.', 'out_norm0.')),
    ('MAFormer', (0, 2), ('stages.3.', 'out_norm1.', 'out_norm3.')),
    ('RefinerViT', (0, 2), ('pyramid.level1.', 'out_norm1.', 'out_norm3.')),
])
def test_what_out_indices_leaves_unused_is_not_built_and_whole_checkpoints_load(
        name, out_indices, unbuilt):
    """Only what feeds an output exists (every parameter gets a gradient); the weights of the
    whole model load into it, its parts' keys skipped, and give the same outputs."""
    whole = getattr(backbones, name)(**TINY_BACKBONES[name]).eval()
    model = getattr(backbones, name)(**TINY_BACKBONES[name], out_indices=out_indices).eval()
    keys = set(model.state_dict())
    assert not any(k.startswith(unbuilt) for k in keys)
    assert all(any(k.startswith(p) for k in whole.state_dict()) for p in unbuilt)
    loadable = model.loadable_state_dict(whole.state_dict())
    assert set(loadable) == keys
    model.load_state_dict(loadable)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, whole_outs = model(x), whole(x)
    for out, i in zip(outs, out_indices):
        torch.testing.assert_close(out, whole_outs[i], rtol=0, atol=0)


def test_refiner_blocks_after_the_last_pyramid_input_are_not_built():
    model = RefinerViT(**TINY_BACKBONES['RefinerViT'], pyramid_block_indexes=(1, 1, 2, 3),
                       out_indices=(0, 1))
    assert len(model.blocks) == 2 and model.num_layers == 4
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match='blocks=.*blocks 0..1 are built'):
        model.forward_tokens(torch.randn(1, 3, 64, 64), (3, ))


# -- activation checkpointing and BatchNorm statistics --------------------------------------
class _OwnForwardBatchNorm(nn.BatchNorm2d):
    """A BatchNorm with a forward of its own: the refiner runs it module by module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _swap_norms(model: nn.Module, norm_type: type) -> None:
    """Every refiner BatchNorm (not the stem's) as ``norm_type``, weights and buffers kept."""
    for block in model.blocks:
        if not block.attn.share:
            continue
        for parent in (block.attn, block.attn.dla):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    new = norm_type(child.num_features).to(child.weight.dtype)
                    new.load_state_dict(child.state_dict())
                    setattr(parent, child_name, new)


@pytest.mark.parametrize('kernel,norm_type', [(3, nn.BatchNorm2d), (2, nn.BatchNorm2d),
                                              (3, _OwnForwardBatchNorm)])
def test_with_cp_updates_batchnorm_statistics_once(kernel, norm_type):
    """One training step with and without ``with_cp``: every BatchNorm counted one batch, and
    the running statistics are equal (float64), for each refiner path: the chunked Function
    (odd kernel), the recomputed formulation (even kernel), module by module (a BatchNorm with
    its own forward)."""
    img = torch.randn(2, 3, 88, 120, dtype=torch.float64)
    buffers = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = RefinerViT(**TINY_BACKBONES['RefinerViT'], with_cp=with_cp,
                           dla_kernel_size=kernel).double().train()
        _swap_norms(model, norm_type)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in model(img)).backward()
        buffers.append(dict(model.named_buffers()))
    plain, checkpointed = buffers
    counts = {k: int(v) for k, v in checkpointed.items() if k.endswith('num_batches_tracked')}
    assert counts and set(counts.values()) == {1}, counts
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-12, atol=1e-12, msg=key)


# -- the refiner's BatchNorm types ----------------------------------------------------------
@pytest.mark.parametrize('norm_type', [nn.SyncBatchNorm, _BatchNormXd])
def test_refiner_takes_the_chunked_path_for_batchnorm_types_that_normalise_locally(norm_type):
    """SyncBatchNorm outside a multi-process run and mmengine's ``_BatchNormXd`` (what it
    reverts SyncBatchNorm to) normalise like BatchNorm2d: the same numbers, the same memory
    (the chunked Function: the map, the mask and one map-sized tensor), bitwise."""
    attn, grad, mask = refiner_inputs(2, 4, 9)
    ref = refine_step(*random_refiner(4), attn, grad, mask)
    dla, adapt_bn = random_refiner(4)
    for parent in (dla, ):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                new = norm_type(child.num_features).double()
                new.load_state_dict(child.state_dict())
                setattr(parent, child_name, new)
    new_bn = norm_type(adapt_bn.num_features).double()
    new_bn.load_state_dict(adapt_bn.state_dict())
    got = refine_step(dla, new_bn, attn, grad, mask)
    assert torch.equal(got['out'], ref['out']) and torch.equal(got['attn_grad'], ref['attn_grad'])
    assert all(torch.equal(g, r) for g, r in zip(got['grads'], ref['grads']))
    assert all(torch.equal(b, r) for b, r in zip(got['buffers'], ref['buffers']))
    assert got['saved_bytes'] == ref['saved_bytes'] <= 3 * attn.numel() * attn.element_size()


def test_module_by_module_refiner_keeps_many_maps():
    """What the bound of the chunked and the synchronised paths is measured against: the
    module formulation keeps ten or more map-sized tensors for its backward."""
    attn, grad, mask = refiner_inputs(2, 4, 9)
    dla, adapt_bn = random_refiner(4)
    own_forward = _OwnForwardBatchNorm(4).double()
    own_forward.load_state_dict(adapt_bn.state_dict())
    got = refine_step(dla, own_forward, attn, grad, mask)
    assert got['saved_bytes'] >= 10 * attn.numel() * attn.element_size()


# -- the position embedding's resize --------------------------------------------------------
@pytest.mark.parametrize('old,new', [((14, 14), (32, 48)), ((14, 14), (5, 3)), ((6, 9), (6, 9)),
                                     ((6, 9), (1, 1)), ((3, 4), (50, 7)), ((14, 14), (15, 13))])
@pytest.mark.parametrize('prefix', [0, 1])
def test_position_embedding_resize_equals_bicubic_interpolation(old, new, prefix):
    """``F.interpolate(mode='bicubic', align_corners=False)`` (timm's resample), float64, up
    and down, odd factors, one token, with and without a class token: within 1e-12."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, prefix + old[0] * old[1], 5, generator=g, dtype=torch.float64)
    grid = pos[:, prefix:].reshape(1, *old, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=new, mode='bicubic', align_corners=False)
    ref = torch.cat([pos[:, :prefix], ref.flatten(2).transpose(1, 2)], dim=1)
    got = resize_abs_pos_embed(pos, new, old, num_prefix_tokens=prefix)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_bicubic_weights_are_rows_summing_to_one():
    weights = bicubic_weights(14, 37, torch.device('cpu'), torch.float64)
    assert weights.shape == (37, 14)
    torch.testing.assert_close(weights.sum(1), torch.ones(37, dtype=torch.float64))


def _autograd_ops(t: torch.Tensor) -> set:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_refiner_training_is_deterministic_and_free_of_interpolation():
    """At a grid other than the position embedding's, the training graph holds no
    interpolation (whose CUDA backward is nondeterministic and raises in deterministic mode),
    and under ``torch.use_deterministic_algorithms(True)`` two steps give equal gradients."""
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(0)
            model = RefinerViT(**TINY_BACKBONES['RefinerViT']).train()
            outs = model(torch.randn(2, 3, 88, 120))
            assert not any('Upsample' in op or 'Interp' in op for op in _autograd_ops(outs[0]))
            sum(o.square().mean() for o in outs).backward()
            grads.append(model.pos_embed.grad.clone())
    finally:
        torch.use_deterministic_algorithms(previous)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])



# -- TF32 and the FSLA clustering -----------------------------------------------------------
def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (nearest), as tensor cores read it."""
    if x.dtype != torch.float32:
        return x
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _token_groups(x: torch.Tensor, layout) -> torch.Tensor:
    """The final group of every token, from :func:`balanced_clustering`."""
    from mmvit_plugins.models.layers.fsla import balanced_clustering
    order = balanced_clustering(x, layout)
    groups = torch.arange(layout.shape.num_groups).repeat_interleave(layout.shape.group_slots)
    out = torch.full((order.shape[0], layout.num_tokens + 1), -1)
    return out.scatter_(1, order, groups.expand_as(order))[:, :-1]


def test_fsla_clustering_keeps_full_precision_where_products_may_run_in_tf32(monkeypatch):
    """The clustering runs in float64 on devices with TF32 (GPUs), float32 on the CPU: with
    its products rounded as TF32 rounds them (emulated), clustered features of 56x56 tokens
    land in other groups for more than 10 % of the tokens, while float32 products agree with
    float64 for more than 99.9 %."""
    from mmvit_plugins.models.layers.fsla import clustering_dtype, group_layout
    assert clustering_dtype(torch.empty(1, device='meta')) == torch.float64
    assert clustering_dtype(torch.empty(1, dtype=torch.bfloat16, device='meta')) == torch.float64
    assert clustering_dtype(torch.empty(1, dtype=torch.bfloat16)) == torch.float32
    assert clustering_dtype(torch.empty(1, dtype=torch.float64)) == torch.float64
    g = torch.Generator().manual_seed(0)
    n, dim = 56 * 56, 32
    centres = torch.randn(6, 40, dim, generator=g, dtype=torch.float64) * 2
    x = centres[:, torch.randint(0, 40, (n, ), generator=g)]
    x = x + torch.randn(6, n, dim, generator=g, dtype=torch.float64)
    layout = group_layout(n, 49, 20, torch.device('cpu'), True)
    exact = _token_groups(x, layout)
    float32 = _token_groups(x.float(), layout)
    baddbmm, matmul = torch.baddbmm, torch.matmul
    monkeypatch.setattr(torch, 'baddbmm', lambda i, a, b, **kw: baddbmm(i, _tf32(a), _tf32(b),
                                                                         **kw))
    monkeypatch.setattr(torch, 'matmul', lambda a, b: matmul(_tf32(a), _tf32(b)))
    tf32 = _token_groups(x.float(), layout)
    assert (float32 != exact).double().mean() < 1e-3
    assert (tf32 != exact).double().mean() > 0.1


def test_timm_feature_model_builds_the_stages_it_returns_and_loads_whole_checkpoints():
    """A timm model built with out_indices (features_only) builds the stages up to the last one
    asked for; a later stage is refused by name; a checkpoint of the whole model filters onto
    it."""
    from mmvit_plugins.models.timm_models import BOATSwinClassifier, checkpoint_filter_fn
    tiny = TINY_BACKBONES['BOATSwin']
    whole = BOATSwinClassifier(num_classes=0, out_indices=(0, 1, 2, 3), **tiny)
    model = BOATSwinClassifier(num_classes=0, out_indices=(0, 1), **tiny)
    assert len(model.backbone.stages) == 2
    model.load_state_dict(checkpoint_filter_fn(whole.state_dict(), model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        ref = whole.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'stages \[2\] are not built'):
        model.forward_intermediates(x, indices=[2], intermediates_only=True)
