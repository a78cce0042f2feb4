"""The checks to run on a GPU machine, in one command within a time budget (``make gpu-check``):

    python tools/analysis/gpu_check.py [--device cuda] [--out-dir work_dirs/gpu_check] \
        [--budget 480] [--tests tests/test_fsla.py tests/test_capture.py] [--select cuda] \
        [--models SPEC ...] [--sizes 224x224 512x512] [--batch-sizes 1 2] \
        [--compile-mode reduce-overhead] [--compile-backend inductor]

1. The device-parametrised tests (parity with the references, graph capture: the ``device``
   fixture of tests/conftest.py adds ``cuda`` where torch sees a GPU) of ``--tests``, those
   whose id holds ``--select`` (default: the device's name), with pytest.
2. ``benchmark_backbones.py``'s table on the device for ``--models`` (default: BOAT-Swin-T,
   BOAT-CSWin-T, MAFormer-T, Refiner-ViT-S and mmdet's Swin-T) at every size and batch,
   inference and a training step, eager and ``torch.compile(mode=--compile-mode)``, with peak
   memory, and the ratios to mmdet's Swin-T where it is measured.

Everything finishes within ``--budget`` seconds: the tests take at most ``--test-share`` of it;
the eager rows run before the compiled ones, each (model, mode) with an equal share of what is
left, and a row that does not finish in its share is reported as a timeout (compiling takes
most of a compiled run; inductor's graph cache, on for the workers, shortens a rerun). The report
(``report.md``: date, torch, device, the tests' summary, the tables), the rows (``rows.json``)
and pytest's output (``pytest.log``) go to ``--out-dir``. Exit status 1 if a test failed.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_backbones as bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = ('BOATSwin:arch=tiny', 'BOATCSWin:arch=tiny', 'MAFormer:arch=tiny',
                  'RefinerViT:arch=small', 'mmdet.SwinTransformer')
BASELINE = 'mmdet.SwinTransformer'
DEFAULT_TESTS = ('tests/test_fsla.py', 'tests/test_capture.py')
MODES = (bench.FORWARD, bench.TRAIN_STEP)


def run_tests(tests: List[str], select: str, timeout: float, log: Path) -> Tuple[bool, str]:
    """pytest on the tests whose id holds ``select``: (passed, pytest's summary line)."""
    cmd = [sys.executable, '-m', 'pytest', *tests, '-q', '-p', 'no:cacheprovider', '-k', select]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, passed = proc.stdout + proc.stderr, proc.returncode == 0
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        summary = lines[-1].strip('= ') if lines else f'pytest exited {proc.returncode}'
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ''
        passed, summary = False, f'timeout (> {timeout:.0f} s)'
    log.write_text(' '.join(cmd) + '\n' + output)
    return passed, summary


def benchmark_rows(args: argparse.Namespace, deadline: float) -> List[Dict]:
    """The table's rows, eager ones first, each (model, mode) run given an equal share of the
    time left before ``deadline``; a compiled row sits in its eager row's ``compiled``."""
    grid = [((h, w), batch) for h, w in args.sizes for batch in args.batch_sizes]
    groups = bench.row_groups(args.device, grid)
    runs = [(spec, group, mode, compile_mode)
            for compile_mode in (None, args.compile_mode)
            for spec in args.models for group in groups for mode in MODES]
    options = argparse.Namespace(device=args.device, threads=0, warmup=args.warmup,
                                 repeats=args.repeats, max_mem_gb=args.max_mem_gb,
                                 compile_backend=args.compile_backend)
    measured: Dict[Tuple, Dict] = {}
    for i, (spec, group, mode, compile_mode) in enumerate(runs):
        share = (deadline - time.monotonic()) / (len(runs) - i)
        options.timeout = max(share, 1.) / len(group)
        for row in bench._run(options, spec, group, mode, compile_mode):
            measured[(row['model'], row['input'], row['batch'], row['mode'],
                      compile_mode)] = row
    rows = [row for key, row in measured.items() if key[-1] is None]
    for row in rows:
        row['compiled'] = measured[(*(row[k] for k in ('model', 'input', 'batch', 'mode')),
                                    args.compile_mode)]
    return rows


def device_name(device: str) -> str:
    import torch
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def report(args: argparse.Namespace, tests: Optional[Tuple[bool, str]], rows: List[Dict],
           seconds: float) -> str:
    import torch
    lines = [f'# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC',
             '', f'- device: {args.device} ({device_name(args.device)}), torch {torch.__version__}',
             f'- command: `python {" ".join(sys.argv)}`',
             f'- took {seconds:.0f} s of a {args.budget:.0f} s budget', '']
    if tests is not None:
        lines += [f"- tests ({' '.join(args.tests)}, `-k {args.select}`): "
                  f"{'passed' if tests[0] else 'FAILED'}: {tests[1]} (pytest.log)", '']
    lines += [f'Backbones, median of {args.repeats} after {args.warmup} warm-up; compiled: '
              f'torch.compile(mode={args.compile_mode!r}, backend={args.compile_backend!r})', '']
    lines += bench.table_header(True) + [bench.table_row(row, True) for row in rows]
    if any(row['model'] == BASELINE for row in rows):
        lines += [''] + bench.ratio_table(rows, BASELINE, list(MODES))
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--out-dir', default='work_dirs/gpu_check')
    parser.add_argument('--budget', type=float, default=480., help='seconds for everything')
    parser.add_argument('--test-share', type=float, default=0.4,
                        help='the largest part of the budget the tests may take')
    parser.add_argument('--tests', nargs='*', default=list(DEFAULT_TESTS),
                        help='pytest paths or node ids; none: skip the tests')
    parser.add_argument('--select', help="pytest -k expression (default: the device's type)")
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--sizes', nargs='+', type=bench.parse_size,
                        default=[(224, 224), (512, 512)])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--compile-mode', default='reduce-overhead', choices=bench.COMPILE_MODES)
    parser.add_argument('--compile-backend', default='inductor')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--max-mem-gb', type=float, default=8.0, help='CPU rows only')
    args = parser.parse_args()
    device = args.device.split(':')[0]
    args.select = args.select or device
    if device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            parser.error('--device cuda: torch sees no CUDA device here')
    for spec in args.models:
        bench.parse_spec(spec)  # fail early on a malformed spec
    if not 0 < args.test_share < 1:
        parser.error(f'--test-share {args.test_share} is invalid; allowed values: (0, 1)')
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # inductor's compiled graphs are cached across processes and runs: a rerun compiles less
    os.environ.setdefault('TORCHINDUCTOR_FX_GRAPH_CACHE', '1')
    start = time.monotonic()
    deadline = start + args.budget
    tests = None
    if args.tests:
        tests = run_tests(args.tests, args.select, args.budget * args.test_share,
                          out / 'pytest.log')
        print(f"tests: {'passed' if tests[0] else 'FAILED'}: {tests[1]}", flush=True)
    rows = benchmark_rows(args, deadline)
    (out / 'rows.json').write_text(json.dumps(rows, indent=2))
    text = report(args, tests, rows, time.monotonic() - start)
    (out / 'report.md').write_text(text)
    print(text)
    sys.exit(0 if tests is None or tests[0] else 1)


if __name__ == '__main__':
    main()
