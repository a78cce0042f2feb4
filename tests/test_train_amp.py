"""Mixed-precision training: ``tools/train.py --amp`` and the AMP configs choose mmengine's
AmpOptimWrapper (fp16, dynamic loss scale) with CUDA and CPUAmpOptimWrapper (bf16) without;
a few ``--amp`` iterations on CPU run the forward in bf16 and write a checkpoint."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS
from torch import nn

from mmvit_plugins.engine import CPUAmpOptimWrapper
from mmvit_plugins.utils.runtime import configure_amp

from .helpers import ROOT
from .test_dist import dump, logged_losses, read_checkpoint, tiny_upernet_config

SEG_AMP = ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k_amp.py'
DET_AMP = ROOT / 'configs' / 'mask_rcnn_boat_swin_t_fpn_1x_coco_amp.py'


@HOOKS.register_module(force=True)
class AutocastProbeHook(Hook):
    """Writes to ``out`` (JSON) what the backbone's first Linear saw in the first training
    forward: whether CPU autocast was on, its dtype, and the Linear's output dtype."""

    def __init__(self, out: str) -> None:
        self.out = out

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if batch_idx != 0:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        linear = next(m for m in model.backbone.modules() if isinstance(m, nn.Linear))

        def record(module, inputs, output) -> None:
            with open(self.out, 'w') as f:
                json.dump(dict(autocast=torch.is_autocast_cpu_enabled(),
                               dtype=str(torch.get_autocast_cpu_dtype()),
                               output=str(output.dtype)), f)
            handle.remove()

        handle = linear.register_forward_hook(record)


def test_configure_amp_without_cuda():
    seg = Config.fromfile(str(SEG_AMP))
    assert seg.optim_wrapper.type == 'AmpOptimWrapper' and seg.optim_wrapper.dtype == 'float16'
    configure_amp(seg)
    assert seg.optim_wrapper.type == 'CPUAmpOptimWrapper'
    assert seg.optim_wrapper.dtype == 'bfloat16' and 'loss_scale' not in seg.optim_wrapper
    assert 'autocast_modules' not in seg.optim_wrapper
    det = Config.fromfile(str(DET_AMP))
    configure_amp(det)
    assert det.optim_wrapper.autocast_modules == ['backbone', 'neck']

    plain = Config.fromfile(str(ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k.py'))
    before = plain.optim_wrapper.to_dict()
    configure_amp(plain)
    assert plain.optim_wrapper.to_dict() == before
    configure_amp(plain, enable=True)
    assert plain.optim_wrapper.type == 'CPUAmpOptimWrapper'
    assert plain.optim_wrapper.optimizer == before['optimizer']


def test_configure_amp_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    plain = Config.fromfile(str(ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k.py'))
    configure_amp(plain, enable=True)
    assert (plain.optim_wrapper.type, plain.optim_wrapper.dtype,
            plain.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'float16', 'dynamic')
    seg = Config.fromfile(str(SEG_AMP))
    seg.optim_wrapper.dtype = 'bfloat16'
    configure_amp(seg, enable=True)
    assert (seg.optim_wrapper.type, seg.optim_wrapper.dtype) == ('AmpOptimWrapper', 'bfloat16')


def test_cpu_amp_optim_wrapper_arguments():
    model = nn.Sequential()
    model.add_module('backbone', nn.Linear(4, 4))
    model.add_module('head', nn.Linear(4, 2))
    optim = dict(type='SGD', lr=0.1)
    with pytest.raises(ValueError, match="dtype='float16'.*allowed values: 'bfloat16'"):
        build_optim_wrapper(model, dict(type='CPUAmpOptimWrapper', dtype='float16',
                                        optimizer=optim))
    with pytest.raises(ValueError, match='autocast_modules'):
        CPUAmpOptimWrapper(autocast_modules='backbone',
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1))

    wrapper = build_optim_wrapper(model, dict(type='CPUAmpOptimWrapper', optimizer=optim,
                                              autocast_modules=['backbone']))
    x = torch.randn(2, 4)
    with wrapper.optim_context(model):
        hidden = model.backbone(x)
        out = model.head(hidden)
    assert hidden.dtype == out.dtype == torch.float32  # cast back after the autocast part
    assert not torch.equal(hidden, model.backbone(x))  # it was computed in bf16
    assert 'forward' not in model.backbone.__dict__
    with pytest.raises(ValueError, match="'neck'.*allowed values.*'backbone', 'head'"):
        with CPUAmpOptimWrapper(autocast_modules=['neck'], optimizer=wrapper.optimizer) \
                .optim_context(model):
            pass

    whole = build_optim_wrapper(model, dict(type='CPUAmpOptimWrapper', optimizer=optim))
    with whole.optim_context(model):
        assert model(x).dtype == torch.bfloat16


def test_train_amp_on_cpu(tmp_path):
    """3 iterations of tools/train.py --amp (tiny BOAT-CSWin UperNet, toy data)."""
    cfg = tiny_upernet_config(tmp_path, 'BOATCSWin', iters=3, checkpoint_interval=3)
    probe = tmp_path / 'probe.json'
    cfg.custom_imports.imports.append('tests.test_train_amp')
    cfg.custom_hooks.append(dict(type='AutocastProbeHook', out=str(probe)))
    work_dir = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'tools/train.py', str(dump(cfg, tmp_path / 'tiny.py')),
                           '--amp', '--work-dir', str(work_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'switched to CPUAmpOptimWrapper' in proc.stdout + proc.stderr
    assert json.loads(probe.read_text()) == dict(autocast=True, dtype='torch.bfloat16',
                                                 output='torch.bfloat16')
    losses = logged_losses(work_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    checkpoint = read_checkpoint(work_dir / 'iter_3.pth')
    assert checkpoint['optimizer']['state'] and 'loss_scaler' not in checkpoint['optimizer']
