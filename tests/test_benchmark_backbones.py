"""tools/analysis/benchmark_backbones.py: model specs, sizes and one measured row."""
import argparse
import subprocess
import sys

import pytest

from .helpers import ROOT, load_tool

SCRIPT = ROOT / 'tools' / 'analysis' / 'benchmark_backbones.py'
bench = load_tool('tools/analysis/benchmark_backbones.py')


def test_parse_spec_literals_nested_commas_and_strings():
    name, kwargs = bench.parse_spec(
        'RefinerViT:arch=small,global_attn_indexes=(6, 7),window_size=14,with_cp=True')
    assert name == 'RefinerViT'
    assert kwargs == dict(arch='small', global_attn_indexes=(6, 7), window_size=14, with_cp=True)
    assert bench.parse_spec('mmdet.SwinTransformer') == ('mmdet.SwinTransformer', {})


def test_bad_spec_and_size_are_named():
    with pytest.raises(ValueError, match="expected key=value, got 'tiny'"):
        bench.parse_spec('BOATSwin:tiny')
    with pytest.raises(argparse.ArgumentTypeError, match='HxW'):
        bench.parse_size('512')
    assert bench.parse_size('800x1216') == (800, 1216)


def test_measures_a_row_per_model_and_size():
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--models', f'BOATSwin:{arch}', '--sizes', '64x96',
         '--batch-sizes', '1', '--repeats', '1', '--warmup', '0', '--backward'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = [line for line in result.stdout.splitlines() if line.startswith('| BOATSwin')]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip('|').split('|')]
    assert cells[1:4] == ['64x96', '1', 'fwd+bwd']
    assert float(cells[5]) > 0  # latency in ms
    assert int(cells[7]) > 0  # aten operators per step
