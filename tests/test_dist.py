"""Distributed runs on CPU: tools/dist_train.sh runs 2 processes (torchrun, gloo) of
tools/train.py on toy data with tiny models, and tools/dist_test.sh evaluates a checkpoint with
2 processes of tools/test.py. Frozen stages (every backbone family, one with activation
checkpointing) train under DDP; a 2-process resume restores each rank's random states."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from mmvit_plugins.checkpoint import load_checkpoint_file
from mmvit_plugins.utils.runtime import register_scope, replace_sync_bn

from .conftest import TINY_BACKBONES
from .helpers import ROOT, load_tool

CONFIG = ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'
# The UperNet config of each backbone family (drop path 0.2-0.3, head dropout 0.1).
FAMILY_CONFIGS = {
    'BOATSwin': 'upernet_boat_swin_t_ade20k.py',
    'BOATCSWin': 'upernet_boat_cswin_t_ade20k.py',
    'MAFormer': 'upernet_maformer_s_ade20k.py',
    'RefinerViT': 'upernet_refiner_vit_s_ade20k.py',
}
TOY_SIZE = 64


def tiny_upernet_config(tmp_path: Path, backbone_type: str, iters: int, checkpoint_interval: int,
                        val_interval: int = 0, **backbone) -> Config:
    """The family's UperNet config on a 4-image toy set, with the tiny backbone of
    ``TINY_BACKBONES`` (``backbone`` overrides its arguments), tiny heads, ``iters`` iterations
    of batch 2, a checkpoint every ``checkpoint_interval`` iterations, validation every
    ``val_interval`` (default: at the end only), seed 0 and every iteration's exact loss in the
    log (window 1, 10 digits)."""
    toy = load_tool('tools/misc/make_toy_dataset.py')
    root = toy.make_seg_toy(str(tmp_path / 'ade'), num_train=4, num_val=1, size=TOY_SIZE)
    cfg = Config.fromfile(str(ROOT / 'configs' / FAMILY_CONFIGS[backbone_type]))
    toy.toy_overrides(cfg, 'seg', str(root), TOY_SIZE)
    cfg.model.backbone.update(TINY_BACKBONES[backbone_type], init_cfg=None, **backbone)
    kwargs = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    register_scope('mmseg')
    widths = list(MODELS.get(backbone_type)(**kwargs).num_features)
    cfg.model.decode_head.update(in_channels=widths, channels=8)
    cfg.model.auxiliary_head.update(in_channels=widths[2], channels=8)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=val_interval or iters)
    cfg.train_dataloader.batch_size = 2  # BN (SyncBN on CPU) needs > 1 value per channel
    cfg.param_scheduler = [dict(type='PolyLR', power=1.0, by_epoch=False, begin=0, end=iters)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=checkpoint_interval)
    cfg.default_hooks.logger.interval = 1
    cfg.log_processor = dict(by_epoch=False, window_size=1, num_digits=10)
    cfg.randomness = dict(seed=0)
    return cfg


def dump(cfg: Config, path: Path) -> Path:
    cfg.dump(str(path))
    return path


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, through the project's safe loader (as the tools read it)."""
    return load_checkpoint_file(str(path))


def logged_losses(work_dir: Path) -> Dict[int, float]:
    """Iteration -> training loss, from the run's ``vis_data/scalars.json``."""
    losses = {}
    for path in work_dir.glob('*/vis_data/scalars.json'):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                losses[record['iter']] = record['loss']
    return losses


def _train_frozen(tmp_path: Path, backbone_type: str, with_cp: bool = False,
                  checkpoint_interval: int = 3, **changes) -> Tuple[Path, Path]:
    """Train the family's tiny UperNet with ``frozen_stages=1`` on 2 processes for 3 iterations
    (the reported failure came at iteration 2; ``changes`` update the config); check that the
    frozen parameters kept their initial values and every other backbone parameter trained.
    Return the config file and work dir."""
    cfg = tiny_upernet_config(tmp_path, backbone_type, iters=3,
                              checkpoint_interval=checkpoint_interval, frozen_stages=1,
                              with_cp=with_cp)
    cfg.merge_from_dict(changes)
    initial, frozen, trainable = _initial_weights(cfg, tmp_path / 'init.pth')
    assert frozen and trainable, (frozen, trainable)
    cfg.load_from = str(tmp_path / 'init.pth')
    config, work_dir = dump(cfg, tmp_path / 'tiny.py'), tmp_path / 'work'
    proc, log = _run_script('dist_train.sh', config, '2', '--work-dir', work_dir)
    assert proc.returncode == 0, log
    trained = read_checkpoint(work_dir / 'iter_3.pth')['state_dict']
    moved = sorted(n for n in frozen if not torch.equal(trained[n], initial[n]))
    assert not moved, f'frozen parameters changed: {moved}'
    still = sorted(n for n in trainable if torch.equal(trained[n], initial[n]))
    assert not still, f'trainable backbone parameters did not change: {still}'
    return config, work_dir


def _initial_weights(cfg: Config, path: Path) -> Tuple[Dict[str, torch.Tensor], Set[str],
                                                      Set[str]]:
    """Build and initialise the model as the run will, save its weights to ``path`` (the run's
    ``load_from``), and return them with the names of the frozen and of the trainable backbone
    parameters."""
    model_cfg = cfg.model.copy()
    replace_sync_bn(model_cfg)  # as tools/train.py does without CUDA
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(model_cfg)
    model.init_weights()
    model.train()  # on the code before 56a621e, freezing happened here only
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.backbone.named_parameters(prefix='backbone')
                 if p.requires_grad}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(dict(state_dict=state), path)
    return state, frozen, trainable


def test_dist_train_and_test_two_cpu_processes(tmp_path):
    """MAFormer, frozen_stages=1: 2-process training, then 2-process evaluation of its
    checkpoint."""
    config, work_dir = _train_frozen(tmp_path, 'MAFormer')
    logs = list(work_dir.rglob('*.log'))
    assert logs and 'Iter(train) [3/3]' in logs[0].read_text()
    assert 'mIoU' in logs[0].read_text()

    test_dir = tmp_path / 'test'
    proc, log = _run_script('dist_test.sh', config, work_dir / 'iter_3.pth', '2',
                            '--work-dir', test_dir)
    assert proc.returncode == 0, log
    logs = list(test_dir.rglob('*.log'))
    assert logs and 'Iter(test) [1/1]' in logs[0].read_text() and 'mIoU' in logs[0].read_text(), log


@pytest.mark.parametrize('backbone_type, with_cp', [('BOATSwin', True), ('RefinerViT', False)])
def test_dist_train_frozen_stages(tmp_path, backbone_type, with_cp):
    _train_frozen(tmp_path, backbone_type, with_cp)


def test_dist_resume_restores_every_rank(tmp_path):
    """BOAT-CSWin, frozen_stages=1, drop path 0.3 and dropout 0.1, a different seed per rank,
    validation at iteration 2: resumed on 2 processes from iter_2.pth, iteration 3 has the same
    loss and the same final weights as the uninterrupted run."""
    config, work_dir = _train_frozen(tmp_path, 'BOATCSWin', checkpoint_interval=1,
                                     **{'randomness.diff_rank_seed': True,
                                        'train_cfg.val_interval': 2})
    saved = read_checkpoint(work_dir / 'iter_2.pth')['random_states']
    assert saved['world_size'] == 2 and sorted(saved['states']) == [0, 1]
    assert not torch.equal(saved['states'][0]['torch'], saved['states'][1]['torch'])

    resumed_dir = tmp_path / 'resumed'
    proc, log = _run_script('dist_train.sh', config, '2', '--work-dir', resumed_dir,
                            '--resume', work_dir / 'iter_2.pth')
    assert proc.returncode == 0, log
    assert logged_losses(resumed_dir) == {3: logged_losses(work_dir)[3]}
    expected = read_checkpoint(work_dir / 'iter_3.pth')['state_dict']
    got = read_checkpoint(resumed_dir / 'iter_3.pth')['state_dict']
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize('script,args', [('dist_train.sh', ('CONFIG', '2')),
                                         ('dist_test.sh', ('CONFIG', 'CKPT', '2'))])
def test_scripts_rendezvous(script, args):
    """One node without PORT: torchrun's standalone rendezvous (no fixed port that two jobs on
    one machine could share); PORT or several nodes: the static rendezvous at MASTER_ADDR:PORT.
    The torchrun command line, printed instead of run."""
    def command(**env) -> str:
        base = {k: v for k, v in os.environ.items()
                if k not in ('PORT', 'NNODES', 'NODE_RANK', 'MASTER_ADDR')}
        proc = subprocess.run(['bash', f'tools/{script}', *args], cwd=ROOT, text=True,
                              capture_output=True, env=dict(base, PYTHON='echo', **env),
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert command().startswith('-m torch.distributed.run --standalone --nproc_per_node=2 ')
    assert '--master_port=29501 ' in command(PORT='29501')
    multi = command(NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1')
    assert '--standalone' not in multi
    assert ('--nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 '
            '--nproc_per_node=2 ') in multi


def _run_script(script: str, *args) -> Tuple[subprocess.CompletedProcess, str]:
    """Run ``tools/<script>`` under torchrun (one node, no PORT: torchrun's standalone
    rendezvous binds a port the system assigns); return it and a log for failures: the exit
    status, every line that names an error, and the tails of both streams."""
    env = {k: v for k, v in os.environ.items() if k not in ('PORT', 'NNODES')}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', f'tools/{script}', *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines()
              if re.search(r'Error|Traceback|Signal|exitcode|Aborted|Segmentation', line)]
    log = (f'{script} exited with {proc.returncode}\nerror lines:\n' + '\n'.join(errors[-40:])
           + f'\n--- stdout tail ---\n{proc.stdout[-2000:]}\n--- stderr tail ---\n'
           f'{proc.stderr[-2000:]}')
    return proc, log
