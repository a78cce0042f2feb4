"""mmvit_plugins.visualization: the records equal what the blocks computed in that forward
(checked through hooks of the tests' own and the blocks' own functions), the pictures have the
documented sizes, bad input is refused with the valid choices, and the forward is unchanged."""
import re
from typing import Dict, List, Tuple

import mmcv
import numpy as np
import pytest
import torch
from mmengine.registry import MODELS
from torch.utils.hooks import RemovableHandle

from mmvit_plugins.models.layers.fsla import balanced_clustering, group_layout
from mmvit_plugins.visualization import (
    AttentionRecorder,
    attention_blocks,
    attention_weights,
    draw_attention,
)
from mmvit_plugins.visualization.pictures import token_at, token_stride

from .conftest import TINY_BACKBONES
from .helpers import load_tool

HW = (61, 75)  # odd sizes: padded stems, partial windows, uneven groups
BOATS = ('BOATSwin', 'BOATCSWin')
visualize_attention = load_tool('tools/analysis/visualize_attention.py')


def _backbone(name: str) -> torch.nn.Module:
    return MODELS.build(dict(type=name, **TINY_BACKBONES[name])).eval()


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*HW, 3), dtype=np.uint8)


def _capture(module: torch.nn.Module, store: List, index: int = -1) -> RemovableHandle:
    """A forward hook of the test's own keeping the module's output (or its input ``index``)."""
    def hook(_, args, out):
        store.append((out if index < 0 else args[index]).detach().clone())
    return module.register_forward_hook(hook)


def _window_of(token: int, grid: Tuple[int, int], ws: int
               ) -> Tuple[int, int, torch.Tensor, torch.Tensor]:
    """The tests' own window arithmetic for one image's windows of side ``ws`` (row-major over
    the grid padded to whole windows): the window of ``token``, its position in it, the (h, w)
    mask of the window's real tokens and their positions in the window (mask order)."""
    ty, tx = divmod(token, grid[1])
    y0, x0 = ty // ws * ws, tx // ws * ws
    index = (ty // ws) * -(-grid[1] // ws) + tx // ws
    inside = torch.zeros(grid, dtype=torch.bool)
    inside[y0:y0 + ws, x0:x0 + ws] = True
    rows, cols = inside.nonzero().t()
    return index, (ty - y0) * ws + tx - x0, inside, (rows - y0) * ws + cols - x0


def _partition(labels: torch.Tensor) -> set:
    """(N,) group of every token -> the set of groups as frozensets of tokens."""
    return {frozenset(torch.nonzero(labels == g).flatten().tolist()) for g in labels.unique()}


@pytest.mark.parametrize('name', BOATS)
def test_clusters_are_the_groups_fsla_used(name):
    """Every token in exactly one group per level; the final groups are the partition of the
    block's own clustering of its queries in that forward; level l is the clustering the block
    makes with 2**(k - l) times larger groups (the hierarchy of the balanced splits)."""
    backbone = _backbone(name)
    x = torch.randn(2, 3, *HW)
    checked = 0
    for fsla_name in attention_blocks(backbone):
        fsla = backbone.get_submodule(fsla_name)
        qkv: List[torch.Tensor] = []
        handle = _capture(fsla.qkv, qkv)
        with AttentionRecorder(backbone, [fsla_name]) as recorder:
            backbone(x)
        handle.remove()
        record = recorder.records[fsla_name]
        n, heads = record.grid[0] * record.grid[1], fsla.num_heads
        if n <= fsla.group_size:
            assert record.num_levels == 0 and record.groups().shape[0] == 0
            continue
        q = qkv[0][0].view(n, 3, heads, -1)[:, 0].transpose(0, 1)  # first image (heads, N, d)
        groups = record.groups().flatten(2)  # (k, heads, N)
        k = record.num_levels
        assert groups.shape == (k, heads, n) and groups.min() >= 0
        for level in range(1, k + 1):
            # the block's layout is tight on the CPU (same groups as static, tested in test_fsla)
            layout = group_layout(n, fsla.group_size << (k - level), fsla.overlap,
                                  torch.device('cpu'), False)
            order = balanced_clustering(q, layout)
            for head in range(heads):
                expected = {frozenset(t for t in slots.tolist() if t < n)
                            for slots in order[head].view(layout.num_groups, -1)}
                assert _partition(groups[level - 1, head]) == expected
                sizes = torch.bincount(groups[level - 1, head])
                assert len(sizes) == 1 << level and sizes.max() - sizes.min() <= 1
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize('name', BOATS)
def test_fsla_query_weights_are_the_weights_sdpa_applied(name):
    """weights @ v of the query's keys = the attention output of that query in that forward;
    the weights sum to 1 over its group and the overlap keys, and are zero elsewhere."""
    backbone = _backbone(name)
    x = torch.randn(1, 3, *HW)
    point = (40, 23)
    for fsla_name in attention_blocks(backbone):
        fsla = backbone.get_submodule(fsla_name)
        qkv, outs = [], []
        handles = [_capture(fsla.qkv, qkv), _capture(fsla.sdpa, outs)]
        with AttentionRecorder(backbone, [fsla_name]) as recorder:
            backbone(x)
        for handle in handles:
            handle.remove()
        record = recorder.records[fsla_name]
        token = token_at(point, HW, record.grid)
        n, heads = record.grid[0] * record.grid[1], fsla.num_heads
        v = qkv[0][0].view(n, 3, heads, -1)[:, 2].transpose(0, 1).double()  # (heads, N, d)
        weights = record.query_weights(token).flatten(1)
        assert torch.allclose(weights.sum(1), torch.ones(heads, dtype=torch.float64))
        if record.layout is None:
            expected = outs[0][0, :, token]
        else:
            slot = [(record.order[h] == token).nonzero()[0, 0] for h in range(heads)]
            slots = record.layout.shape.group_slots
            expected = torch.stack([outs[0][h, s // slots, s % slots]
                                    for h, s in zip(range(heads), slot)])
            group = record.groups()[-1].flatten(1)
            same = group == group[:, token:token + 1]
            assert (weights[same] > 0).all()
            # outside the group: only the (at most `overlap`) keys borrowed from the sibling
            assert ((weights > 0) & ~same).sum(1).max() <= fsla.overlap
        actual = torch.einsum('hn,hnd->hd', weights, v)
        torch.testing.assert_close(actual, expected.double(), rtol=1e-5, atol=1e-6)


def test_attention_weights_equal_torch_sdpa_in_float64():
    q, k, v = torch.randn(3, 2, 5, 7, 4, dtype=torch.float64).unbind(0)
    bias = torch.randn(5, 7, 7, dtype=torch.float64)
    keep = torch.rand(5, 1, 7) > 0.3
    keep[..., 0] = True
    for mask in (None, bias, keep):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                    scale=0.3)
        actual = attention_weights(q, k, mask, 0.3) @ v
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('options', [{}, dict(with_cls_token=True, global_attn_indexes='all')])
def test_refiner_maps_are_what_enters_and_leaves_the_refiner(options):
    """Windowed (block 1) and global (block 3, or all with a class token) sharing blocks: the
    query's rows of the maps given to and returned by the refiner, over the query's window or
    the whole grid."""
    backbone = MODELS.build(dict(type='RefinerViT', **{**TINY_BACKBONES['RefinerViT'],
                                                      **options})).eval()
    x = torch.randn(2, 3, *HW)
    seen: Dict[str, list] = {}
    for name in attention_blocks(backbone):
        dla = backbone.get_submodule(name).dla
        refine = dla.refine

        def recording(attn, *args, _name=name, _refine=refine, **kwargs):
            out = _refine(attn, *args, **kwargs)
            seen[_name] = [attn.clone(), out.clone()]
            return out
        dla.refine = recording
    with AttentionRecorder(backbone) as recorder:
        backbone(x)
    assert len(seen) == 2
    point = (70, 50)  # in a partial window
    for name, (before, after) in seen.items():
        record = recorder.records[name]
        grid = record.grid
        token = token_at(point, HW, grid)
        got_before, got_after = record.query_maps(token)
        assert got_before.shape == got_after.shape == (2, *grid)
        if not record.window_size:
            extra = int(bool(options))
            assert record.extra_tokens == extra
            expected = [m[0, :, extra + token, extra:].view(2, *grid) for m in (before, after)]
            torch.testing.assert_close([got_before, got_after], expected, rtol=0, atol=0)
            continue
        index, position, inside, window_pos = _window_of(token, grid, record.window_size)
        for got, full in ((got_before, before), (got_after, after)):
            assert got[:, ~inside].isnan().all() and not got[:, inside].isnan().any()
            expected = full[index, :, position][:, window_pos]
            torch.testing.assert_close(got[:, inside], expected, rtol=0, atol=0)


def test_maformer_window_and_global_tokens_are_what_the_block_computed():
    """Window weights @ v and fusion weights @ v equal those attentions' outputs for the query;
    the footprints give the GLD's global tokens from the block's normed map."""
    backbone = _backbone('MAFormer')
    x = torch.randn(2, 3, *HW)
    point = (70, 58)
    for name in attention_blocks(backbone):
        block = backbone.get_submodule(name)
        local_qkv, local_out, fusion_kv, fusion_out, gld_in, gld_out = ([] for _ in range(6))
        handles = [_capture(block.local_attn.attn.qkv, local_qkv),
                   _capture(block.local_attn.attn.sdpa, local_out),
                   _capture(block.fusion_attn.kv, fusion_kv),
                   _capture(block.fusion_attn.sdpa, fusion_out),
                   _capture(block.gld, gld_in, index=0), _capture(block.gld, gld_out)]
        with AttentionRecorder(backbone, [name]) as recorder:
            backbone(x)
        for handle in handles:
            handle.remove()
        record = recorder.records[name]
        grid, heads = record.grid, block.fusion_attn.num_heads
        token = token_at(point, HW, grid)
        # window attention: the query's window, its position in it
        local = record.local_weights(token)
        ws = record.window_size
        index, position, inside, window_pos = _window_of(token, grid, ws)
        assert local[:, ~inside].isnan().all() and not local[:, inside].isnan().any()
        v = local_qkv[0][index].view(ws * ws, 3, heads, -1)[:, 2].transpose(0, 1).double()
        torch.testing.assert_close(local[:, inside].sum(1), torch.ones(heads, dtype=torch.float64))
        actual = torch.einsum('hl,hld->hd', local[:, inside], v[:, window_pos])
        torch.testing.assert_close(actual, local_out[0][index, :, position].double(),
                                   rtol=1e-5, atol=1e-6)
        # fusion attention over the global tokens
        weights = record.global_weights(token)
        v_global = fusion_kv[0][0].view(-1, 2, heads, v.shape[-1])[:, 1].transpose(0, 1)
        torch.testing.assert_close(torch.einsum('hm,hmd->hd', weights, v_global.double()),
                                   fusion_out[0][0, :, token].double(), rtol=1e-5, atol=1e-6)
        # footprints: global token j = sum over the map of footprint_j * map + bias + pos
        gld = block.gld
        map_ = gld_in[0][0].double().flatten(0, 1)  # (h * w, C)
        tokens = record.footprints().flatten(1) @ map_
        tokens = tokens + gld.token_fc.bias.double()[:, None] + gld.pos_embed[0].double()
        torch.testing.assert_close(tokens, gld_out[0][0].double(), rtol=1e-5, atol=1e-5)
        assert grid != tuple(gld.grid_size)  # the pulled-back footprints were exercised


def _panels(path: str) -> tuple:
    shape = mmcv.imread(path).shape
    assert shape[0] % HW[0] == 0 and shape[1] % HW[1] == 0, (path, shape)
    return shape[0] // HW[0], shape[1] // HW[1]


@pytest.mark.parametrize('name', list(TINY_BACKBONES))
def test_pictures_have_the_documented_panels(name, tmp_path):
    backbone = _backbone(name)
    image = _image()
    x = torch.randn(1, 3, *HW)
    with torch.no_grad():
        reference = backbone(x)
    paths = draw_attention(backbone, x, image, str(tmp_path), query=(74, 60))
    kinds = attention_blocks(backbone)
    files = {p.split('/')[-1]: p for p in paths}
    assert _panels(files.pop('pyramid.png')) == (1, len(reference))
    with AttentionRecorder(backbone) as recorder:
        with torch.no_grad():
            again = backbone(x)
    for out, ref in zip(again, reference):  # the hooks change nothing
        assert torch.equal(out, ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.modules())
    for block, kind in kinds.items():
        stem = block.replace('.', '_')
        record = recorder.records[block]
        if kind == 'clusters':
            heads = backbone.get_submodule(block).num_heads
            assert _panels(files.pop(f'{stem}_clusters.png')) == (heads,
                                                                   max(record.num_levels, 1))
            assert _panels(files.pop(f'{stem}_query.png')) == (1, heads)
        elif kind == 'refiner':
            heads = backbone.get_submodule(block).num_heads
            assert _panels(files.pop(f'{stem}_refiner.png')) == (heads + 1, 2)
        else:
            assert _panels(files.pop(f'{stem}_window.png')) == (1, 5)
    assert not files  # nothing undocumented


def test_cluster_picture_paints_each_group_in_one_colour(tmp_path):
    """The last column of the first head's row: as many colours as groups, one per group."""
    backbone = _backbone('BOATCSWin')
    image = np.full((*HW, 3), 128, dtype=np.uint8)  # grey: the colours are the groups'
    x = torch.randn(1, 3, *HW)
    name = next(iter(attention_blocks(backbone)))
    with AttentionRecorder(backbone, [name]) as recorder:
        with torch.no_grad():
            backbone(x)
    path = draw_attention(backbone, x, image, str(tmp_path), ['clusters'], [name])[0]
    record = recorder.records[name]
    k = record.num_levels
    picture = mmcv.imread(path, channel_order='rgb')[:HW[0], (k - 1) * HW[1]:k * HW[1]]
    stride = token_stride(HW, record.grid)
    groups = record.groups()[-1, 0]
    colour_of = {}
    for (ty, tx), group in np.ndenumerate(groups.numpy()):
        # a pixel away from the token's borders (which are darkened) and the caption
        y, x_ = ty * stride + stride // 2, tx * stride + stride // 2
        if y < 20 or y >= HW[0] or x_ >= HW[1]:
            continue
        colour_of.setdefault(group, set()).add(tuple(picture[y, x_]))
    assert all(len(colours) == 1 for colours in colour_of.values())
    distinct = {next(iter(c)) for c in colour_of.values()}
    assert len(distinct) == len(colour_of)


def test_bad_input_names_the_valid_choices(tmp_path):
    image, x = _image(), torch.randn(1, 3, *HW)
    maformer, boat = _backbone('MAFormer'), _backbone('BOATSwin')
    with pytest.raises(ValueError, match=r"'clusters' needs BOAT FSLA blocks.*this model has "
                       r"none \(its attention pictures: \['window'\]\)"):
        draw_attention(maformer, x, image, str(tmp_path), ['clusters'])
    with pytest.raises(ValueError, match=r"block 'stages.9' is not an attention block of this "
                       r"model; valid choices \(index or name\): 0: stages.0.blocks.1.fsla, "):
        draw_attention(boat, x, image, str(tmp_path), blocks=['stages.9'])
    with pytest.raises(ValueError, match=r'block 7 is not .* 2: stages.2.blocks.1.fsla$'):
        draw_attention(boat, x, image, str(tmp_path), blocks=[7])
    with pytest.raises(ValueError, match=r'--query 75 3 is outside the image; allowed values: '
                       r'X in \[0, 74\], Y in \[0, 60\]'):
        draw_attention(boat, x, image, str(tmp_path), query=(75, 3))
    with pytest.raises(ValueError, match=r'--heads \[2\] is invalid .* allowed values: 0..1'):
        draw_attention(boat, x, image, str(tmp_path), blocks=[-1], heads=[2])
    with pytest.raises(ValueError, match=r"pictures \['attention'\] are invalid; allowed "
                       r"values: \('pyramid', 'clusters', 'refiner', 'window'\)"):
        draw_attention(boat, x, image, str(tmp_path), ['attention'])
    assert not list(tmp_path.iterdir())  # nothing written on bad input


def test_tool_takes_a_timm_model_name(tmp_path, capsys):
    """A timm name builds the ``features_only`` model: its FSLA blocks and pyramid drawn."""
    image = tmp_path / 'image.png'
    mmcv.imwrite(_image(), str(image))
    paths = visualize_attention.main(['boat_swin_tiny', 'none', str(image), '--out-dir',
                                      str(tmp_path / 'out'), '--blocks', '-1', '--heads', '0'])
    assert capsys.readouterr().out.split() == paths
    names = [p.split('/')[-1] for p in paths]
    assert names == ['pyramid.png', 'model_backbone_stages_2_blocks_5_fsla_clusters.png',
                     'model_backbone_stages_2_blocks_5_fsla_query.png']
    # stride 16: a 4 x 5 map of 20 tokens, at most one group of m = 49
    assert [_panels(p) for p in paths] == [(1, 4), (1, 1), (1, 1)]


@pytest.mark.parametrize('argv,message', [
    (['boat_swin_tinyx', 'none'], "CONFIG 'boat_swin_tinyx' is neither a config file nor a "
     'timm model name; names of this package: boat_cswin_base, '),
    (['maformer_tiny', 'missing.pth'], "CHECKPOINT 'missing.pth' is not a file; allowed "
     "values: a checkpoint file or 'none'"),
    (['maformer_tiny', 'none', '--pictures', 'refiner'], "'refiner' needs Refiner-ViT sharing "
     "blocks .* this model has none \\(its attention pictures: \\['window'\\]\\)"),
])
def test_tool_refuses_bad_arguments(argv, message, tmp_path, capsys):
    image = tmp_path / 'image.png'
    mmcv.imwrite(_image(), str(image))
    argv = [*argv[:2], str(image), *argv[2:], '--out-dir', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(argv)
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert re.search(message, text), text
    assert not (tmp_path / 'out').exists()
