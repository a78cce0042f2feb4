"""Distributed runs on CPU: tools/dist_train.sh runs 2 processes (torchrun, gloo) of
tools/train.py for 2 iterations on toy data with a tiny model, and tools/dist_test.sh evaluates
the checkpoint it wrote with 2 processes of tools/test.py."""
import os
import re
import socket
import subprocess
import sys
from typing import Tuple

from mmengine.config import Config

from .helpers import ROOT, load_tool

CONFIG = ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_dist_train_two_cpu_processes(tmp_path):
    toy = load_tool('tools/misc/make_toy_dataset.py')
    root = toy.make_seg_toy(str(tmp_path / 'ade'), num_train=4, num_val=1, size=64)
    cfg = Config.fromfile(str(CONFIG))
    toy.toy_overrides(cfg, 'seg', str(root), 64)
    cfg.model.backbone.update(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                                        num_heads=(1, 2, 2, 4)), init_cfg=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16)
    cfg.model.auxiliary_head.update(in_channels=64, channels=8)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2)
    cfg.train_dataloader.batch_size = 2  # BN (SyncBN on CPU) needs > 1 value per channel
    cfg.param_scheduler = [dict(type='PolyLR', power=1.0, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=2)
    cfg.default_hooks.logger.interval = 1
    config = tmp_path / 'tiny_dist.py'
    cfg.dump(str(config))

    work_dir = tmp_path / 'work'
    proc, log = _run_script('dist_train.sh', config, '2', '--work-dir', work_dir)
    assert proc.returncode == 0, log
    assert (work_dir / 'iter_2.pth').is_file(), log
    logs = list(work_dir.rglob('*.log'))
    assert logs and 'Iter(train) [2/2]' in logs[0].read_text(), log
    assert 'mIoU' in logs[0].read_text(), log

    test_dir = tmp_path / 'test'
    proc, log = _run_script('dist_test.sh', config, work_dir / 'iter_2.pth', '2',
                            '--work-dir', test_dir)
    assert proc.returncode == 0, log
    logs = list(test_dir.rglob('*.log'))
    assert logs and 'Iter(test) [1/1]' in logs[0].read_text() and 'mIoU' in logs[0].read_text(), log


def _run_script(script: str, *args) -> Tuple[subprocess.CompletedProcess, str]:
    """Run ``tools/<script>`` under torchrun on a free port; return it and a log for failures:
    the exit status, every line that names an error, and the tails of both streams."""
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', f'tools/{script}', *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines()
              if re.search(r'Error|Traceback|Signal|exitcode|Aborted|Segmentation', line)]
    log = (f'{script} exited with {proc.returncode}\nerror lines:\n' + '\n'.join(errors[-40:])
           + f'\n--- stdout tail ---\n{proc.stdout[-2000:]}\n--- stderr tail ---\n'
           f'{proc.stderr[-2000:]}')
    return proc, log
