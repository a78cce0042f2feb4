"""Distributed training on CPU: tools/dist_train.sh runs 2 processes (torchrun, gloo) of
tools/train.py for 2 iterations on toy data with a tiny model."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'


def _load_toy_module():
    path = ROOT / 'tools' / 'misc' / 'make_toy_dataset.py'
    spec = importlib.util.spec_from_file_location('make_toy_dataset', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_dist_train_two_cpu_processes(tmp_path):
    toy = _load_toy_module()
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
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert (work_dir / 'iter_2.pth').is_file(), log
    logs = list(work_dir.rglob('*.log'))
    assert logs and 'Iter(train) [2/2]' in logs[0].read_text(), log
    assert "'mIoU'" in log or 'mIoU' in logs[0].read_text()
