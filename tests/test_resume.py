"""Exact resume: RandomStateHook's states survive a weights-only load and restore every
generator; a run resumed from a checkpoint (a fresh process, as after a kill) equals the
uninterrupted run bit for bit, with drop path, dropout and random augmentation on; without the
hook it does not."""
import random
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import torch

from mmvit_plugins.engine import (
    RandomStateHook,
    capture_random_states,
    hooks,
    restore_random_states,
)

from .helpers import ROOT
from .test_dist import dump, logged_losses, read_checkpoint, tiny_upernet_config


def _draw() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_random_states_weights_only_round_trip():
    np.random.randn(1)  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = capture_random_states()
    with tempfile.TemporaryFile() as f:
        torch.save(dict(random_states=state), f)
        f.seek(0)
        loaded = torch.load(f, weights_only=True)['random_states']
    expected = _draw()
    restore_random_states(loaded)
    assert _draw() == expected


def test_hook_keeps_mmengine_seeding_for_another_world_size(monkeypatch):
    """A checkpoint written by 2 processes, resumed on 1: a warning, no restore."""
    messages = []
    monkeypatch.setattr(hooks, 'print_log', lambda msg, **kwargs: messages.append(msg))
    hook = RandomStateHook()
    other = capture_random_states()
    _draw()
    runner = SimpleNamespace(seed=0, iter=4, epoch=0, hooks=[],
                             train_loop=SimpleNamespace(dataloader_iterator=iter(())))
    hook.after_load_checkpoint(runner, dict(meta=dict(seed=0), random_states=dict(
        world_size=2, states={0: other, 1: other})))
    before = capture_random_states()
    hook.before_train(runner)
    assert torch.equal(capture_random_states()['torch'], before['torch'])
    assert isinstance(runner.train_loop.dataloader_iterator, type(iter(())))
    assert len(messages) == 1 and "keep mmengine's seeding (seed 0)" in messages[0]


def _train(*args: str) -> None:
    proc = subprocess.run([sys.executable, 'tools/train.py', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_resume_equals_uninterrupted_run(tmp_path):
    """BOAT-CSWin UperNet (drop path 0.3, head dropout 0.1, random resize/crop/flip/photometric
    augmentation in the main process), 6 iterations with a checkpoint and a validation every 3.
    A new process resumed from iter_3.pth (what a run killed after writing it leaves) logs the
    same losses for iterations 4-6 and ends with the same weights; resumed without the hook, it
    does not. The config sets no seed (as the base configs): the resumed run takes the
    checkpoint's."""
    cfg = tiny_upernet_config(tmp_path, 'BOATCSWin', iters=6, checkpoint_interval=3,
                              val_interval=3)
    cfg.randomness = dict(seed=None)
    assert cfg.model.backbone.drop_path_rate > 0 and cfg.model.decode_head.dropout_ratio > 0
    assert dict(type='RandomStateHook') in cfg.custom_hooks  # from the base config
    config = str(dump(cfg, tmp_path / 'tiny.py'))
    full, resumed, unhooked = tmp_path / 'full', tmp_path / 'resumed', tmp_path / 'unhooked'
    _train(config, '--work-dir', str(full))
    _train(config, '--work-dir', str(resumed), '--resume', str(full / 'iter_3.pth'))
    _train(config, '--work-dir', str(unhooked), '--resume', str(full / 'iter_3.pth'),
           '--cfg-options', 'custom_hooks=[]')

    expected = {i: loss for i, loss in logged_losses(full).items() if i > 3}
    assert sorted(expected) == [4, 5, 6]
    assert logged_losses(resumed) == expected
    final = read_checkpoint(full / 'iter_6.pth')['state_dict']
    weights = read_checkpoint(resumed / 'iter_6.pth')['state_dict']
    assert [k for k in final if not torch.equal(final[k], weights[k])] == []

    assert logged_losses(unhooked)[4] != expected[4]
    weights = read_checkpoint(unhooked / 'iter_6.pth')['state_dict']
    assert any(not torch.equal(final[k], weights[k]) for k in final)
