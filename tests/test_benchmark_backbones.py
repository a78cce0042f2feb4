"""tools/analysis/benchmark_backbones.py: model specs, sizes and one measured row."""
import argparse
import json
import subprocess
import sys
from typing import List, Tuple

import pytest
from matplotlib.image import imread
from PIL import Image

from .helpers import ROOT, load_tool

SCRIPT = ROOT / 'tools' / 'analysis' / 'benchmark_backbones.py'
GPU_CHECK = ROOT / 'tools' / 'analysis' / 'gpu_check.py'
bench = load_tool('tools/analysis/benchmark_backbones.py')


def _measure(model: str, *args: str) -> Tuple[str, List[List[str]]]:
    """Run the script on ``model`` (a spec; not passed with --from-json) with ``args``; return
    its stdout and the cells of the table rows of that model."""
    source = [] if '--from-json' in args else ['--models', model]
    result = subprocess.run([sys.executable, str(SCRIPT), *source, *args],
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


def test_train_times_inference_and_a_training_step_with_ratios(tmp_path):
    """Also: --plot draws the measured rows, and --from-json prints and draws the saved ones
    without measuring."""
    arch = "arch={'embed_dims':8,'depths':(1,1,1,1),'num_heads':(1,1,1,1)}"
    spec = f'BOATSwin:{arch}'
    png, saved = tmp_path / 'rows.png', tmp_path / 'rows.json'
    stdout, rows = _measure(spec, '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
                            '--train', '--baseline', spec, '--json', str(saved),
                            '--plot', str(png))
    assert [row[3] for row in rows] == ['fwd', 'fwd+bwd']
    # a training step dispatches the forward's operators and their backward
    assert int(rows[1][7]) > int(rows[0][7]) > 0
    assert 'ratios to ' + spec + ':' in stdout
    assert stdout.splitlines()[-1] == f'plot: {png}'
    assert imread(png).shape == (400, 1200, 4)  # 12 x 4 inches at 100 dpi, RGBA

    replot = tmp_path / 'replot.png'
    replayed, replayed_rows = _measure(spec, '--from-json', str(saved), '--plot', str(replot))
    assert replayed.splitlines()[0] == f'rows of {saved}'
    assert replayed_rows == rows
    assert replayed.splitlines()[-1] == f'plot: {replot}'
    assert imread(replot).shape == (400, 1200, 4)


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


def _plot_row(model: str, size: str, batch: int, mode: str, **result) -> dict:
    return dict(model=model, input=size, batch=batch, mode=mode, **result)


def test_plot_draws_every_run_and_lists_those_without_result(tmp_path):
    """Hand-made rows of two models, two modes, two batch sizes and three sizes (given out of
    pixel order), a timeout, an OOM, and compiled twins: every line holds exactly its runs'
    values at their pixel counts, the failed runs are left out and listed."""
    sizes = {'64x64': 4096, '32x48': 1536, '96x96': 9216}  # input: pixels
    rows = []
    for batch in (1, 2):
        for model, scale in (('A', 1.), ('B:arch=tiny', 3.)):
            for mode, factor in (('fwd', 1.), ('fwd+bwd', 2.5)):
                for size, pixels in sizes.items():
                    rows.append(_plot_row(model, size, batch, mode, params_m=1.,
                                          latency_ms=scale * factor * pixels * batch / 1000,
                                          peak_mb=scale * factor * pixels * batch / 100,
                                          ops=10))
    timeout = next(r for r in rows if (r['model'], r['input'], r['batch'], r['mode']) ==
                   ('B:arch=tiny', '96x96', 2, 'fwd+bwd'))
    for key in ('latency_ms', 'peak_mb', 'params_m', 'ops'):
        del timeout[key]
    timeout['error'] = 'timeout (> 600 s)'
    for row in rows:
        if (row['model'], row['mode'], row['batch']) == ('A', 'fwd', 1):
            row['compiled'] = (dict(latency_ms=row['latency_ms'] / 2, peak_mb=1., compile_s=9.)
                               if row['input'] != '32x48' else dict(error='OOM'))
    path = tmp_path / 'plot.png'
    fig = bench.plot_rows(rows, str(path), 'title')

    assert Image.open(path).size == (1200, 800)  # 12 x (4 per batch size) inches, 100 dpi
    titles = ['latency (ms), batch 1', 'peak memory (MB), batch 1',
              'latency (ms), batch 2', 'peak memory (MB), batch 2']
    assert [ax.get_title() for ax in fig.axes] == titles
    x = [1536, 4096, 9216]
    for ax, (what, batch) in zip(fig.axes, [('latency', 1), ('memory', 1), ('latency', 2),
                                           ('memory', 2)]):
        unit = 1000 if what == 'latency' else 100
        lines = {line.get_label(): line for line in ax.get_lines()}
        expected = {f'{m} {mode}': (x, [s * f * p * batch / unit for p in x])
                    for m, s in (('A', 1.), ('B:arch=tiny', 3.))
                    for mode, f in (('fwd', 1.), ('fwd+bwd', 2.5))}
        if batch == 2:  # the timeout
            expected['B:arch=tiny fwd+bwd'] = (x[:2], expected['B:arch=tiny fwd+bwd'][1][:2])
        else:  # the OOM of the compiled run at 32x48
            expected['A fwd compiled'] = (x[1:], [p / 1000 / 2 if what == 'latency' else 1.
                                                  for p in x[1:]])
        assert sorted(lines) == sorted(expected)
        for label, (xs, ys) in expected.items():
            assert list(lines[label].get_xdata()) == xs, label
            assert list(lines[label].get_ydata()) == pytest.approx(ys), label
        assert lines['A fwd'].get_linestyle() == '-' and lines['A fwd+bwd'].get_linestyle() == '--'
        assert lines['A fwd'].get_color() == lines['A fwd+bwd'].get_color() != \
            lines['B:arch=tiny fwd'].get_color()
        if batch == 1:
            assert lines['A fwd compiled'].get_marker() != lines['A fwd'].get_marker()
        assert list(ax.get_xticks()) == x
    for ax in fig.axes[2:]:  # the shared x axis is labelled under the last panel row
        assert [t.get_text() for t in ax.get_xticklabels()] == ['32x48', '64x64', '96x96']
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        'A', 'B:arch=tiny', 'fwd', 'fwd+bwd', 'eager', 'compiled']
    notes = [t.get_text().replace('\n', ' ') for t in fig.texts if 'not drawn' in t.get_text()]
    assert len(notes) == 1
    assert 'A fwd compiled 32x48 batch 1: OOM' in notes[0]
    assert 'B:arch=tiny fwd+bwd 96x96 batch 2: timeout (> 600 s)' in notes[0]


def test_from_json_needs_the_rows_of_json(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'model': 'A'}))
    with pytest.raises(ValueError, match='expected the non-empty list of rows'):
        bench.load_rows(str(bad))
    result = subprocess.run([sys.executable, str(SCRIPT), '--from-json', str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f'--from-json {bad}: expected' in result.stderr
