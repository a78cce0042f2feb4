"""Latency and peak memory of backbones, side by side, at several input sizes.

    python tools/analysis/benchmark_backbones.py \
        --models BOATSwin:arch=tiny BOATCSWin:arch=tiny mmdet.SwinTransformer \
        --sizes 224x224 512x512 800x1216 --batch-sizes 1 2 [--train | --backward] \
        [--baseline mmdet.SwinTransformer] [--device cuda] \
        [--compile [MODE] [--compile-backend inductor]] [--json rows.json] [--plot rows.png]
    python tools/analysis/benchmark_backbones.py --from-json rows.json [--plot rows.png]

A model spec is ``Type[:key=value,key=value]``; ``Type`` is a registered mmvit_plugins backbone
or ``mmdet.X`` / ``mmseg.X`` for a backbone of those codebases, values are Python literals
(anything else is taken as a string). On CPU each (model, size, batch) runs in its own process so
that peak memory is its own: the growth of the process's peak resident memory over the resident
memory just before the first forward (weights and input excluded). On CUDA one process per
(model, mode) measures every size and batch (no import and start-up per row): a row's peak is the
growth of ``torch.cuda.max_memory_allocated`` over what is allocated before its first forward.
Runs that exceed ``--max-mem-gb`` (CPU: address-space limit on the worker's data) or
``--timeout`` (seconds per row) are reported as such instead of taking the machine down.

``ops`` counts the aten operators one warm step dispatches, views and bare allocations excluded
(``mmvit_plugins.utils.op_count``): on a GPU about the number of kernel launches, which sets the
latency where launching is slower than the kernels run.

Modes: ``fwd`` is an inference forward (eval mode, no autograd); ``fwd+bwd`` a training step
(train mode, forward and backward of the sum of the outputs' means). ``--train`` measures both,
each in its own process; ``--backward`` only the training step. With ``--baseline SPEC`` (one of
``--models``) a second table gives every model's latency and operators over the baseline's at the
same size, batch and mode, the train-step ratio next to the inference one.

``--compile [MODE]`` (``default``, ``reduce-overhead``, ``max-autotune``...) also measures every
row with ``torch.compile(model, mode=MODE, backend=--compile-backend)`` in its own process and
prints it beside the eager one: its latency (after the compiling first call and the warm-up),
the speed-up over eager, its peak memory, and the first call's seconds (compilation included)
apart. ``reduce-overhead`` replays CUDA graphs on a GPU: the first call compiles, the warm-up
records, the timed calls replay. ``--compile-backend aot_eager`` captures the graphs without
generating code (a check that compiling works, fast; no speed-up expected).

``--plot FILE.png`` draws the rows (``plot_rows``): latency (left) and peak memory (right)
against the input's pixel count, one line per model and mode (solid ``fwd``, dashed
``fwd+bwd``; compiled runs with open squares), one panel row per batch size; runs without a
result are listed under the panels. ``--from-json`` prints and draws the rows that ``--json``
saved, without measuring.
"""
import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WORKER_FLAG = '--worker'
FORWARD, TRAIN_STEP = 'fwd', 'fwd+bwd'
# torch.compile's modes (``torch._inductor.list_mode_options``).
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
# How torch (CUDA and CPU allocators) and Python report an allocation over the limit.
OOM_MESSAGES = ('out of memory', "can't allocate memory", 'memoryerror')
# --plot's image: width and height per batch size in inches, and dots per inch.
PLOT_WIDTH_IN, PLOT_ROW_HEIGHT_IN, PLOT_DPI = 12.0, 4.0, 100


def parse_spec(spec: str) -> Tuple[str, Dict]:
    name, _, rest = spec.partition(':')
    kwargs = {}
    for item in filter(None, _split_top_level(rest)):
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(f'model spec {spec!r}: expected key=value, got {item!r}')
        try:
            kwargs[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value
    return name, kwargs


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets: 'a=(1,2),b=3' -> ['a=(1,2)', 'b=3']."""
    parts, depth, current = [], 0, ''
    for char in text:
        depth += char in '([{'
        depth -= char in ')]}'
        if char == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += char
    return parts + [current]


def parse_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'size {text!r} must look like HxW, e.g. 512x512') from None
    return h, w


def build_backbone(name: str, kwargs: Dict):
    if name.startswith('mmdet.'):
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules()
        name = name[len('mmdet.'):]
    elif name.startswith('mmseg.'):
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
        register_all_modules()
        name = name[len('mmseg.'):]
    else:
        from mmengine.registry import MODELS

        import mmvit_plugins  # noqa: F401
    return MODELS.build(dict(type=name, **kwargs))


def row_modes(rows: List[Dict]) -> List[str]:
    """The modes that ``rows`` have, ``fwd`` first."""
    return [mode for mode in (FORWARD, TRAIN_STEP) if any(r['mode'] == mode for r in rows)]


def measured_modes(args: argparse.Namespace) -> List[str]:
    """The modes to run: ``fwd`` by default, ``fwd+bwd`` with --backward, both with --train."""
    if args.train:
        return [FORWARD, TRAIN_STEP]
    return [TRAIN_STEP] if args.backward else [FORWARD]


def ratio_table(rows: List[Dict], baseline: str, modes: List[str]) -> List[str]:
    """Markdown lines: latency and operators of every other model over ``baseline`` (same
    input, batch and mode); ``-`` where either run has no result."""
    base = {(r['input'], r['batch'], r['mode']): r for r in rows if r['model'] == baseline}
    head = ' | '.join(f'{mode} latency | {mode} ops' for mode in modes)
    lines = [f'ratios to {baseline}:', f'| model | input | batch | {head} |',
             '|---|---|---|' + '---|' * 2 * len(modes)]
    keys = []
    for r in rows:
        if r['model'] != baseline and (r['model'], r['input'], r['batch']) not in keys:
            keys.append((r['model'], r['input'], r['batch']))
    for model, size, batch in keys:
        cells = []
        for mode in modes:
            row = next((r for r in rows if (r['model'], r['input'], r['batch'], r['mode']) ==
                        (model, size, batch, mode)), {})
            ref = base.get((size, batch, mode), {})
            for key, fmt in (('latency_ms', '{:.2f}'), ('ops', '{:.2f}')):
                ok = key in row and key in ref
                cells.append(fmt.format(row[key] / ref[key]) if ok else '-')
        lines.append(f'| {model} | {size} | {batch} | ' + ' | '.join(cells) + ' |')
    return lines


def table_header(compiled: bool) -> List[str]:
    """The table's markdown header; with compiled runs, their columns after the eager ones."""
    cells = ['model', 'input', 'batch', 'mode', 'params (M)', 'latency (ms)', 'peak mem (MB)',
             'ops']
    if compiled:
        cells += ['compiled (ms)', 'speed-up', 'compiled peak mem (MB)', 'compile (s)']
    return ['| ' + ' | '.join(cells) + ' |', '|' + '---|' * len(cells)]


def table_row(row: Dict, compiled: bool) -> str:
    """One markdown row: the eager measurement (or its error), and the compiled one's beside
    it (``row['compiled']``); ``-`` where a run has no result."""
    cells = [row['model'], row['input'], row['batch'], row['mode']]
    if 'error' in row:
        cells += ['-', row['error'], '-', '-']
    else:
        cells += [f"{row['params_m']:.2f}", f"{row['latency_ms']:.1f}", f"{row['peak_mb']:.0f}",
                  row['ops']]
    if compiled:
        comp = row.get('compiled', {})
        if 'latency_ms' not in comp:
            cells += ['-', comp.get('error', '-'), '-', '-']
        else:
            speedup = (f"{row['latency_ms'] / comp['latency_ms']:.2f}x" if 'latency_ms' in row
                       else '-')
            cells += [f"{comp['latency_ms']:.1f}", speedup, f"{comp['peak_mb']:.0f}",
                      f"{comp['compile_s']:.1f}"]
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _pixels(size: str) -> int:
    h, w = parse_size(size)
    return h * w


def _no_result(row: Dict, run: Dict, compiled: bool) -> str:
    """The line of ``--plot``'s list of runs without a result: ``run`` is ``row`` or its
    compiled twin."""
    what = f"{row['model']} {row['mode']}{' compiled' if compiled else ''}"
    return f"{what} {row['input']} batch {row['batch']}: {run.get('error', 'no result')}"


def plot_rows(rows: List[Dict], path: str, title: str = '') -> 'Figure':
    """Draw ``rows`` (as printed and written by --json) to the PNG ``path`` and return the
    ``matplotlib.figure.Figure``.

    One panel row per batch size (ascending), two panels each: latency (ms) left, peak memory
    (MB) right, ``fig.axes`` in that order. x is the input's pixel count (ticks labelled HxW).
    One line per model spec and mode (color: model; solid: ``fwd``, dashed: ``fwd+bwd``),
    labelled ``'{model} {mode}'``; compiled runs (``row['compiled']``) as a second line with
    open square markers, labelled ``'{model} {mode} compiled'``. Runs without a result
    (timeout, OOM) are left out of the lines and listed under the panels. The image is
    ``PLOT_WIDTH_IN x PLOT_ROW_HEIGHT_IN * batch sizes`` inches at ``PLOT_DPI``.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    batches = sorted({r['batch'] for r in rows})
    models = list(dict.fromkeys(r['model'] for r in rows))
    modes = row_modes(rows)
    compiled = any('compiled' in r for r in rows)
    colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
    color = {model: colors[i % len(colors)] for i, model in enumerate(models)}
    style = {FORWARD: '-', TRAIN_STEP: '--'}
    ticks: Dict[int, List[str]] = {}
    for size in sorted({r['input'] for r in rows}, key=lambda s: (_pixels(s), s)):
        ticks.setdefault(_pixels(size), []).append(size)

    fig = Figure(figsize=(PLOT_WIDTH_IN, PLOT_ROW_HEIGHT_IN * len(batches)), dpi=PLOT_DPI,
                 layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(batches), 2, squeeze=False, sharex=True)
    not_drawn = []
    for (lat_ax, mem_ax), batch in zip(axes, batches):
        for model in models:
            for mode in modes:
                same = [r for r in rows
                        if (r['model'], r['mode'], r['batch']) == (model, mode, batch)]
                for twin in (False, True):
                    runs = [(r, r['compiled'] if twin else r) for r in same
                            if not twin or 'compiled' in r]
                    points = sorted(((_pixels(r['input']), run) for r, run in runs
                                     if 'latency_ms' in run), key=lambda point: point[0])
                    not_drawn += [_no_result(r, run, twin) for r, run in runs
                                  if 'latency_ms' not in run]
                    if not points:
                        continue
                    marker = (dict(marker='s', markerfacecolor='none') if twin else
                              dict(marker='o'))
                    label = f"{model} {mode}{' compiled' if twin else ''}"
                    for ax, key in ((lat_ax, 'latency_ms'), (mem_ax, 'peak_mb')):
                        ax.plot([x for x, _ in points], [run[key] for _, run in points],
                                color=color[model], linestyle=style[mode], label=label,
                                **marker)
        for ax, what in ((lat_ax, 'latency (ms)'), (mem_ax, 'peak memory (MB)')):
            ax.set_title(f'{what}, batch {batch}')
            ax.set_ylabel(what)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_xticks(list(ticks), ['\n'.join(sizes) for sizes in ticks.values()],
                          rotation=30, ha='right')
    for ax in axes[-1]:
        ax.set_xlabel('input HxW (placed at its pixel count)')
    if title:
        fig.suptitle(title)
    handles = [Line2D([], [], color=color[m], label=m) for m in models]
    handles += [Line2D([], [], color='gray', linestyle=style[m], label=m) for m in modes]
    if compiled:
        handles += [Line2D([], [], color='gray', marker='o', linestyle='none', label='eager'),
                    Line2D([], [], color='gray', marker='s', markerfacecolor='none',
                           linestyle='none', label='compiled')]
    fig.legend(handles=handles, loc='outside right upper', fontsize='small')
    if not_drawn:
        fig.supxlabel(textwrap.fill('no result, not drawn: ' + '; '.join(not_drawn), 180),
                      x=0.01, ha='left', fontsize='small')
    fig.savefig(path, dpi=PLOT_DPI)
    return fig


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _measure_row(args: argparse.Namespace, model, forward, x) -> Dict:
    """Latency, peak memory and (eager) operators of one step at one input in this process."""
    import torch

    from mmvit_plugins.utils.op_count import dispatched_ops

    cuda = x.device.type == 'cuda'

    def step():
        if args.backward:
            out = forward(x)
            sum(o.float().mean() for o in out).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                forward(x)
        if cuda:
            torch.cuda.synchronize()

    base = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    compile_s = None
    if args.compile:
        start = time.perf_counter()
        step()  # compiles
        compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    row = dict(latency_ms=1000 * statistics.median(times), peak_mb=max(peak, 0) / 2**20,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if args.compile:
        row['compile_s'] = compile_s
    else:
        row['ops'] = sum(dispatched_ops(step).values())
    return row


def run_worker(args: argparse.Namespace) -> None:
    """Measure one model at every (size, batch) of ``args`` in this process, printing each
    row as a JSON line as soon as it is measured."""
    import torch

    if args.device == 'cpu' and args.max_mem_gb:
        limit = int(args.max_mem_gb * 2**30) + _rss_bytes() + 2**30
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.manual_seed(0)
    name, kwargs = parse_spec(args.models[0])
    model = build_backbone(name, kwargs).to(args.device)
    model.train(args.backward)
    forward = model
    if args.compile:
        mode = None if args.compile == 'default' else args.compile
        forward = torch.compile(model, mode=mode, backend=args.compile_backend)
    for h, w in args.sizes:
        for batch in args.batch_sizes:
            row = dict(input=f'{h}x{w}', batch=batch)
            try:
                x = torch.randn(batch, 3, h, w, device=args.device)
                row.update(_measure_row(args, model, forward, x))
            except torch.cuda.OutOfMemoryError:  # the next (smaller) rows may still fit
                row['error'] = 'OOM'
            x = None
            model.zero_grad(set_to_none=True)
            if args.device.startswith('cuda'):
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)


def _shared_process(device: str) -> bool:
    """The rows of one model and mode share a worker on CUDA, whose allocator reports each
    row's peak; on the CPU each row takes its own process (its peak resident memory)."""
    return device.startswith('cuda')


def _run(args: argparse.Namespace, spec: str, shapes: List[Tuple[Tuple[int, int], int]],
         mode: str, compile_mode: Optional[str] = None) -> List[Dict]:
    """(model, mode) at every ((H, W), batch) of ``shapes`` in one worker process: one row each,
    with ``error`` where it has no result; compiled with ``torch.compile(mode=compile_mode)``
    if one is given. ``shapes`` must be a (sizes x batches) grid."""
    sizes = list(dict.fromkeys(size for size, _ in shapes))
    batches = list(dict.fromkeys(batch for _, batch in shapes))
    cmd = [sys.executable, __file__, WORKER_FLAG, '--models', spec,
           '--sizes', *(f'{h}x{w}' for h, w in sizes),
           '--batch-sizes', *(str(b) for b in batches), '--device', args.device,
           '--threads', str(args.threads), '--warmup', str(args.warmup),
           '--repeats', str(args.repeats), '--max-mem-gb', str(args.max_mem_gb)]
    if mode == TRAIN_STEP:
        cmd.append('--backward')
    if compile_mode:
        cmd += ['--compile', compile_mode, '--compile-backend', args.compile_backend]
    rows = {(f'{h}x{w}', b): dict(model=spec, input=f'{h}x{w}', batch=b, mode=mode)
            for (h, w), b in shapes}
    error = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.timeout * len(shapes))
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0:
            err = stderr.lower()
            oom = any(m in err for m in OOM_MESSAGES) or proc.returncode in (-9, 137)
            limit = '' if _shared_process(args.device) else f' (> {args.max_mem_gb:g} GB)'
            error = (f'OOM{limit}' if oom else
                     (stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1][:120])
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ''
        error = f'timeout (> {args.timeout:g} s)'
    for line in stdout.splitlines():
        if line.startswith('{'):
            measured = json.loads(line)
            rows[(measured.pop('input'), measured.pop('batch'))].update(measured)
    for row in rows.values():
        if 'latency_ms' not in row and 'error' not in row:
            row['error'] = error or 'not measured'
    return list(rows.values())


def row_groups(device: str, grid: List[Tuple[Tuple[int, int], int]]
               ) -> List[List[Tuple[Tuple[int, int], int]]]:
    """The ((H, W), batch) shapes of ``grid`` measured together, one worker process each."""
    return [grid] if _shared_process(device) else [[shape] for shape in grid]


def measure_all(args: argparse.Namespace, modes: List[str]) -> Iterator[Dict]:
    """Every row of the table, eager with its compiled twin in ``row['compiled']`` (with
    --compile); yielded as soon as measured."""
    grid = [((h, w), batch) for h, w in args.sizes for batch in args.batch_sizes]
    for group in row_groups(args.device, grid):
        for spec in args.models:
            for mode in modes:
                rows = _run(args, spec, group, mode)
                if args.compile:
                    for row, comp in zip(rows, _run(args, spec, group, mode, args.compile)):
                        row['compiled'] = comp
                yield from rows


def load_rows(path: str) -> List[Dict]:
    """The rows written by ``--json`` to ``path``."""
    with open(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f'--from-json {path}: not JSON ({exc})') from None
    keys = {'model', 'input', 'batch', 'mode'}
    if not (isinstance(rows, list) and rows and
            all(isinstance(r, dict) and keys <= r.keys() for r in rows)):
        raise ValueError(f'--from-json {path}: expected the non-empty list of rows that --json '
                         f'writes, each with the keys {sorted(keys)}')
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--models', nargs='+', help='model specs (see above)')
    source.add_argument('--from-json', metavar='ROWS.json',
                        help='instead of measuring, print (and --plot) the rows saved by --json')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=[(224, 224)])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument('--backward', action='store_true',
                       help='time only a training step (forward + backward)')
    modes.add_argument('--train', action='store_true',
                       help='time inference and a training step (forward + backward)')
    parser.add_argument('--baseline', help='model spec (one of --models) to divide by')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--max-mem-gb', type=float, default=8.0)
    parser.add_argument('--timeout', type=float, default=600.0, help='seconds per run')
    parser.add_argument('--compile', nargs='?', const='default', metavar='MODE',
                        help='also measure torch.compile(mode=MODE) (default: "default")')
    parser.add_argument('--compile-backend', default='inductor',
                        help='torch.compile backend for --compile (inductor, aot_eager, ...)')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    parser.add_argument('--plot', metavar='FILE.png',
                        help='also draw latency and peak memory against input size to this PNG')
    parser.add_argument(WORKER_FLAG, action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return
    if args.from_json:
        try:
            rows = load_rows(args.from_json)
        except ValueError as exc:
            parser.error(str(exc))
        models = list(dict.fromkeys(r['model'] for r in rows))
        modes = row_modes(rows)
        compiled = any('compiled' in r for r in rows)
        title = f'rows of {args.from_json}'
    else:
        for spec in args.models:
            parse_spec(spec)  # fail early on a malformed spec
        models, modes, compiled = args.models, measured_modes(args), bool(args.compile)
        if args.compile and args.compile not in COMPILE_MODES:
            parser.error(f'--compile {args.compile!r} is invalid; allowed values: '
                         f'{COMPILE_MODES}')
        if args.device.split(':')[0] == 'cuda':
            import torch
            if not torch.cuda.is_available():
                parser.error('--device cuda: torch sees no CUDA device here')
        title = (f'device: {args.device}, torch threads: {args.threads or "default"}, '
                 f'median of {args.repeats} after {args.warmup} warm-up'
                 + (f'; compiled: torch.compile(mode={args.compile!r}, backend='
                    f'{args.compile_backend!r})' if args.compile else ''))
    if args.baseline is not None and args.baseline not in models:
        source = '--from-json' if args.from_json else '--models'
        parser.error(f'--baseline {args.baseline!r} must be one of {source}: {models}')

    print(title)
    print('\n'.join(table_header(compiled)), flush=True)
    if args.from_json:
        print('\n'.join(table_row(row, compiled) for row in rows))
    else:
        rows = []
        for row in measure_all(args, modes):
            rows.append(row)
            print(table_row(row, compiled), flush=True)
    if args.baseline is not None:
        print('\n' + '\n'.join(ratio_table(rows, args.baseline, modes)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot_rows(rows, args.plot, title)
        print(f'plot: {args.plot}')


if __name__ == '__main__':
    main()
