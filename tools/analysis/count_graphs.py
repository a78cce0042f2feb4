"""How many graphs ``torch.compile`` builds for a backbone over a series of input sizes.

    python tools/analysis/count_graphs.py \
        --models MAFormer:arch=tiny RefinerViT:arch=small \
        --sizes 512x512 512x640 640x640 800x1088 800x1216 --batch-size 2 \
        [--dynamic none true marked] [--backend eager] [--reasons]

Every (model, ``dynamic``) runs in its own process (dynamo's caches and automatic-dynamic
state start empty) and calls the compiled model (``fullgraph=True``, eval mode, no autograd)
once per size in the order given; a backend that counts its calls counts the graphs. The
number of graphs does not depend on the widths: tiny archs count as fast. ``--reasons``
prints the guard failures that made dynamo recompile.

``--dynamic``: ``none`` is torch.compile's default (a static first graph, then the sizes that
changed symbolic), ``true`` is ``dynamic=True``, ``marked`` is the default with the batch, height
and width of every input marked dynamic (``torch._dynamo.maybe_mark_dynamic``). ``true`` and
the default give equal input sizes one symbol ("duck shaping"): a graph compiled at a square
input guards on H == W, and the first non-square size compiles a second one; marked sizes get
a symbol each. torch 2.4's ``dynamic=True`` also turns every int attribute of the modules
(window and group sizes, heads, ...) into a graph input, which makes the shape reasoning of
BOAT's graphs, and its compile time, many times larger; ``marked`` keeps them constants
(later torch versions do so by default: ``allow_unspec_int_on_nn_module``). For BOAT, the FSLA
level counts of every size (``model.fsla_levels((H, W))``) are printed with it: dynamic shapes
give at most one graph per distinct tuple of level counts.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_backbones import build_backbone, parse_size, parse_spec  # noqa: E402

WORKER_FLAG = '--worker'
DYNAMIC = {'none': None, 'true': True, 'false': False, 'marked': None}
MARKED_DIMS = (0, 2, 3)  # batch, height, width


class _Reasons(logging.Handler):
    """Collects dynamo's recompilation messages (``torch._logs`` artifact ``recompiles``)."""

    def __init__(self):
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def count_graphs(model, shapes: Sequence[Tuple[int, int, int]], dynamic: Optional[bool],
                 backend: str = 'eager', device: str = 'cpu', marked: bool = False,
                 check: Optional[Callable] = None) -> Dict:
    """Compile ``model`` (eval, ``fullgraph=True``) and call it on a random input of every
    (batch, height, width) in ``shapes``: graphs compiled in all, after each call, and the
    seconds each call took (compilation included). ``marked``: every input's batch, height
    and width are marked dynamic. ``check(x, outputs)``, if given, runs after each call."""
    import torch
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(backend)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return compiler(gm, example_inputs)

    torch._dynamo.reset()
    model = model.to(device).eval()
    compiled = torch.compile(model, backend=counting, dynamic=dynamic, fullgraph=True)
    after, seconds = [], []
    for batch, h, w in shapes:
        x = torch.randn(batch, 3, h, w, device=device)
        if marked:
            for dim in MARKED_DIMS:
                torch._dynamo.maybe_mark_dynamic(x, dim)
        start = time.perf_counter()
        with torch.no_grad():
            outs = compiled(x)
        seconds.append(time.perf_counter() - start)
        after.append(len(graphs))
        if check is not None:
            check(x, outs)
    return dict(graphs=len(graphs), graphs_after=after, seconds=seconds)


def run_worker(args: argparse.Namespace) -> Dict:
    import torch

    name, kwargs = parse_spec(args.models[0])
    torch.manual_seed(0)
    model = build_backbone(name, kwargs)
    reasons = _Reasons()
    if args.reasons:
        torch._logging.set_logs(recompiles=True)
        logging.getLogger('torch._dynamo').addHandler(reasons)
    row = count_graphs(model, [(args.batch_size, h, w) for h, w in args.sizes],
                       DYNAMIC[args.dynamic[0]], args.backend, args.device,
                       marked=args.dynamic[0] == 'marked')
    if hasattr(model, 'fsla_levels'):
        row['fsla_levels'] = [list(model.fsla_levels(hw)) for hw in args.sizes]
    row['reasons'] = [m for m in reasons.messages if 'triggered by' in m or '- ' in m]
    return row


def _run(args: argparse.Namespace, spec: str, dynamic: str) -> Dict:
    cmd = [sys.executable, __file__, WORKER_FLAG, '--models', spec, '--dynamic', dynamic,
           '--sizes', *(f'{h}x{w}' for h, w in args.sizes), '--batch-size',
           str(args.batch_size), '--backend', args.backend, '--device', args.device]
    if args.reasons:
        cmd.append('--reasons')
    row = dict(model=spec, dynamic=dynamic)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode == 0:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            error = next((line for line in reversed(lines) if 'Error' in line), lines[-1])
            row['error'] = error.strip()[:200]
    except subprocess.TimeoutExpired:
        row['error'] = f'timeout (> {args.timeout:g} s)'
    return row


def table(rows: List[Dict], sizes: List[Tuple[int, int]]) -> List[str]:
    """Markdown lines: graphs in all, graphs after each size, and the first call's seconds."""
    names = ' | '.join(f'{h}x{w}' for h, w in sizes)
    lines = [f'| model | dynamic | graphs | graphs after {names} | first call (s) |',
             '|---|---|---|' + '---|' * len(sizes) + '---|']
    for row in rows:
        if 'error' in row:
            lines.append(f"| {row['model']} | {row['dynamic']} | {row['error']} |"
                         + ' - |' * (len(sizes) + 1))
            continue
        after = ' | '.join(str(n) for n in row['graphs_after'])
        lines.append(f"| {row['model']} | {row['dynamic']} | {row['graphs']} | {after} | "
                     f"{row['seconds'][0]:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', required=True,
                        help='model specs, as for benchmark_backbones.py')
    parser.add_argument('--sizes', nargs='+', type=parse_size,
                        default=[(512, 512), (512, 640), (640, 640), (800, 1088), (800, 1216)])
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--dynamic', nargs='+', choices=list(DYNAMIC),
                        default=['none', 'true', 'marked'],
                        help="torch.compile's dynamic argument (none: automatic; marked: "
                             "automatic with batch, height and width marked dynamic)")
    parser.add_argument('--backend', default='eager',
                        help="a torch.compile backend (eager, aot_eager, inductor)")
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--reasons', action='store_true',
                        help='print the guard failures behind every recompilation')
    parser.add_argument('--timeout', type=float, default=1800.0, help='seconds per run')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    parser.add_argument(WORKER_FLAG, action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    for spec in args.models:
        parse_spec(spec)  # fail early on a malformed spec
    print(f'torch.compile(fullgraph=True, backend={args.backend!r}), batch {args.batch_size}, '
          f'device {args.device}, eval', flush=True)
    rows = []
    for spec in args.models:
        for dynamic in args.dynamic:
            row = _run(args, spec, dynamic)
            rows.append(row)
            print(table([row], args.sizes)[-1], flush=True)
            if row.get('fsla_levels'):
                print(f"  FSLA levels per size: {[tuple(v) for v in row['fsla_levels']]}")
            for reason in row.get('reasons', []):
                print(f'  recompiled: {reason}')
    print('\n' + '\n'.join(table(rows, args.sizes)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
