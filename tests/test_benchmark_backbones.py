"""tools/analysis/benchmark_backbones.py: model specs, sizes and one measured row."""
import argparse
import json
import subprocess
import sys
from typing import List, Tuple

import pytest

from .helpers import ROOT, load_tool

SCRIPT = ROOT / 'tools' / 'analysis' / 'benchmark_backbones.py'
GPU_CHECK = ROOT / 'tools' / 'analysis' / 'gpu_check.py'
bench = load_tool('tools/analysis/benchmark_backbones.py')


def _measure(model: str, *args: str) -> Tuple[str, List[List[str]]]:
    """Run the script on ``model`` (a spec) with ``args``; return its stdout and the cells of
    the table rows of that model."""
    result = subprocess.run([sys.executable, str(SCRIPT), '--models', model, *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    prefix = '| ' + model.split(':')[0]
    rows = [[c.strip() for c in line.strip('|').split('|')]
            for line in result.stdout.splitlines() if line.startswith(prefix)]
    return result.stdout, rows


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


def test_modes_and_ratio_table():
    args = argparse.Namespace(train=False, backward=False)
    assert bench.measured_modes(args) == ['fwd']
    assert bench.measured_modes(argparse.Namespace(train=False, backward=True)) == ['fwd+bwd']
    assert bench.measured_modes(argparse.Namespace(train=True, backward=False)) == [
        'fwd', 'fwd+bwd']
    rows = [dict(model=m, input='224x224', batch=1, mode=mode, latency_ms=ms, ops=ops)
            for m, mode, ms, ops in [('A', 'fwd', 20., 100), ('A', 'fwd+bwd', 60., 300),
                                     ('B', 'fwd', 10., 80), ('B', 'fwd+bwd', 40., 200)]]
    rows.append(dict(model='A', input='512x512', batch=1, mode='fwd', error='timeout'))
    rows.append(dict(model='B', input='512x512', batch=1, mode='fwd', latency_ms=1., ops=1))
    lines = bench.ratio_table(rows, 'B', ['fwd', 'fwd+bwd'])
    assert lines[0] == 'ratios to B:'
    assert lines[1] == ('| model | input | batch | fwd latency | fwd ops | fwd+bwd latency | '
                        'fwd+bwd ops |')
    assert lines[3:] == ['| A | 224x224 | 1 | 2.00 | 1.25 | 1.50 | 1.50 |',
                         '| A | 512x512 | 1 | - | - | - | - |']


def test_baseline_must_be_measured_and_modes_exclude_each_other():
    for extra, message in ((['--baseline', 'mmdet.SwinTransformer'], 'must be one of --models'),
                           (['--train', '--backward'], 'not allowed with')):
        result = subprocess.run([sys.executable, str(SCRIPT), '--models', 'BOATSwin', *extra],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr


def test_measures_a_row_per_model_and_size():
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    _, rows = _measure(f'BOATSwin:{arch}', '--sizes', '64x96', '--batch-sizes', '1',
                       '--repeats', '1', '--warmup', '0', '--backward')
    assert len(rows) == 1
    cells = rows[0]
    assert cells[1:4] == ['64x96', '1', 'fwd+bwd']
    assert float(cells[5]) > 0  # latency in ms
    assert int(cells[7]) > 0  # aten operators per step


def test_train_times_inference_and_a_training_step_with_ratios():
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    spec = f'BOATSwin:{arch}'
    stdout, rows = _measure(spec, '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
                            '--train', '--baseline', spec)
    assert [row[3] for row in rows] == ['fwd', 'fwd+bwd']
    # a training step dispatches the forward's operators and their backward
    assert int(rows[1][7]) > int(rows[0][7]) > 0
    assert 'ratios to ' + spec + ':' in stdout


def test_compiled_columns_beside_the_eager_ones():
    row = dict(model='A', input='224x224', batch=1, mode='fwd', params_m=1., latency_ms=30.,
               peak_mb=10., ops=100, compiled=dict(latency_ms=20., peak_mb=12., compile_s=41.))
    header = bench.table_header(True)
    assert header[0].endswith('| ops | compiled (ms) | speed-up | compiled peak mem (MB) | '
                              'compile (s) |')
    assert bench.table_row(row, True) == ('| A | 224x224 | 1 | fwd | 1.00 | 30.0 | 10 | 100 | '
                                          '20.0 | 1.50x | 12 | 41.0 |')
    row['compiled'] = dict(error='timeout (> 600 s)')
    assert bench.table_row(row, True).endswith('| 100 | - | timeout (> 600 s) | - | - |')
    assert bench.table_row(row, False).endswith('| 100 |')


def test_compile_measures_eager_and_compiled_side_by_side():
    arch = "arch={'embed_dims':16,'depths':(1,1,1,1),'num_heads':(1,2,2,4)},pretrain_img_size=64"
    stdout, rows = _measure(f'MAFormer:{arch}', '--sizes', '64x96', '--repeats', '1',
                            '--warmup', '0', '--compile', '--compile-backend', 'eager')
    assert "torch.compile(mode='default', backend='eager')" in stdout
    cells = rows[0]
    assert len(cells) == 12
    assert float(cells[5]) > 0 and float(cells[8]) > 0  # eager and compiled latency
    assert cells[9].endswith('x')
    assert float(cells[11]) > 0  # the first, compiling call


def test_compile_mode_is_checked():
    result = subprocess.run([sys.executable, str(SCRIPT), '--models', 'BOATSwin', '--compile',
                             'fast'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--compile 'fast' is invalid; allowed values: ('default', 'reduce-overhead'" in \
        result.stderr


def test_one_worker_measures_every_size_and_batch():
    """The worker of a (model, mode) that CUDA runs share: one JSON row per size and batch."""
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--worker', '--models', f'BOATSwin:{arch}', '--sizes',
         '64x96', '61x75', '--batch-sizes', '1', '2', '--repeats', '1', '--warmup', '0'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    assert [(r['input'], r['batch']) for r in rows] == [
        ('64x96', 1), ('64x96', 2), ('61x75', 1), ('61x75', 2)]
    assert all(r['latency_ms'] > 0 and r['ops'] > 0 and r['peak_mb'] >= 0 for r in rows)


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """``make gpu-check``'s command in a small form on the CPU: the selected device-parametrised
    tests, then eager and compiled rows of both modes, in its report and rows file."""
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    test = 'tests/test_fsla.py::test_small_group_overlap_and_bias_options'
    result = subprocess.run(
        [sys.executable, str(GPU_CHECK), '--device', 'cpu', '--out-dir', str(tmp_path),
         '--tests', test, '--models', f'BOATSwin:{arch}', '--sizes', '61x75',
         '--batch-sizes', '1', '--compile-mode', 'default', '--compile-backend', 'eager',
         '--warmup', '0', '--repeats', '1', '--budget', '250'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / 'report.md').read_text()
    assert f'- tests ({test}, `-k cpu`): passed: 3 passed' in report
    assert (tmp_path / 'pytest.log').read_text().splitlines()[0].endswith(f'{test} -q -p '
                                                                       'no:cacheprovider -k cpu')
    rows = json.loads((tmp_path / 'rows.json').read_text())
    assert [(r['input'], r['batch'], r['mode']) for r in rows] == [
        ('61x75', 1, 'fwd'), ('61x75', 1, 'fwd+bwd')]
    assert all(r['latency_ms'] > 0 and r['compiled']['latency_ms'] > 0 for r in rows)
    assert all(r['compiled']['compile_s'] > 0 and r['ops'] > 0 for r in rows)
    assert all(bench.table_row(r, True) in report for r in rows)
