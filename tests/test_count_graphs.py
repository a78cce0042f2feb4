"""tools/analysis/count_graphs.py: the graphs torch.compile builds over a series of sizes."""
import torch

from mmvit_plugins.models.backbones import MAFormer
from tests.conftest import TINY_BACKBONES

from .helpers import load_tool

count = load_tool('tools/analysis/count_graphs.py')
SIZES = [(64, 96), (96, 128)]


def test_marked_dimensions_share_one_graph_static_shapes_take_one_per_size():
    torch.manual_seed(0)
    model = MAFormer(**TINY_BACKBONES['MAFormer'])
    shapes = [(2, h, w) for h, w in SIZES]
    marked = count.count_graphs(model, shapes, count.DYNAMIC['marked'], marked=True)
    static = count.count_graphs(model, shapes, count.DYNAMIC['false'])
    assert (marked['graphs'], marked['graphs_after']) == (1, [1, 1])
    assert (static['graphs'], static['graphs_after']) == (2, [1, 2])
    assert len(marked['seconds']) == len(SIZES)
    rows = [dict(model='maformer', dynamic='marked', **marked),
            dict(model='maformer', dynamic='none', error='timeout (> 5 s)')]
    lines = count.table(rows, SIZES)
    assert lines[0].startswith('| model | dynamic | graphs | graphs after 64x96 | 96x128 |')
    assert lines[2].startswith('| maformer | marked | 1 | 1 | 1 | ')
    assert lines[3] == '| maformer | none | timeout (> 5 s) | - | - | - |'
