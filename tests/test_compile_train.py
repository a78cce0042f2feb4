"""``compile`` in a config trains: mmengine compiles a segmentor's whole ``train_step`` with
``torch.compile``, ``EagerOptimizerHook`` keeping the optimizer step out of dynamo; a
detector's backbone and neck are compiled (``CompileModulesHook``). The first iterations' losses
of the toy UperNet and Mask R-CNN equal eager training's for every backbone family (dynamo's
``eager`` backend keeps it fast: the point is the capture of mmengine's, mmseg's and mmdet's
training step around our backbones; the backbones' numerics under aot_eager are
``tests/test_capture.py``'s)."""
import re
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS

from mmvit_plugins.engine import CompileModulesHook, EagerOptimizerHook
from mmvit_plugins.utils.runtime import configure_compile, register_scope

from .conftest import TINY_BACKBONES
from .helpers import ROOT, load_tool
from .test_dist import TOY_SIZE, _run_script, dump, logged_losses, tiny_upernet_config

FAMILIES = sorted(TINY_BACKBONES)
DET_CONFIGS = {
    'BOATSwin': 'mask_rcnn_boat_swin_t_fpn_1x_coco.py',
    'BOATCSWin': 'mask_rcnn_boat_cswin_t_fpn_1x_coco.py',
    'MAFormer': 'mask_rcnn_maformer_t_fpn_1x_coco.py',
    'RefinerViT': 'mask_rcnn_refiner_vit_s_fpn_1x_coco.py',
}
ITERS = 2
# Graphs and graph breaks of the compiled runs, the same for every backbone family: a
# detector's backbone and neck compile to one graph each, without a break; mmengine's
# segmentor train_step breaks 21 times outside the backbone (the optimizer wrapper's context
# manager, deepcopy of config dicts, mmseg's losses calling nonzero), 15 graphs.
COMPILED_STEP = {'det': (2, 0), 'seg': (15, 21)}


def tiny_mask_rcnn_config(tmp_path: Path, backbone_type: str, iters: int) -> Config:
    """The family's Mask R-CNN config on a 4-image toy set (one image size), with the tiny
    backbone, 16-channel FPN and heads, ``iters`` iterations of batch 2 and exact losses logged."""
    toy = load_tool('tools/misc/make_toy_dataset.py')
    root = toy.make_det_toy(str(tmp_path / 'coco'), num_train=4, num_val=1, size=TOY_SIZE)
    cfg = Config.fromfile(str(ROOT / 'configs' / DET_CONFIGS[backbone_type]))
    toy.toy_overrides(cfg, 'det', str(root), TOY_SIZE)
    cfg.model.backbone.update(TINY_BACKBONES[backbone_type], init_cfg=None)
    kwargs = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    register_scope('mmdet')
    model = cfg.model
    model.neck.update(in_channels=list(MODELS.get(backbone_type)(**kwargs).num_features),
                      out_channels=16)
    model.rpn_head.update(in_channels=16, feat_channels=16)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = 16
    roi.bbox_head.update(in_channels=16, fc_out_channels=32)
    roi.mask_head.update(in_channels=16, conv_out_channels=16)
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 64
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters)
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
    cfg.train_dataloader.pop('batch_sampler', None)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=iters)
    cfg.default_hooks.logger.interval = 1
    cfg.log_processor = dict(by_epoch=False, window_size=1, num_digits=10)
    cfg.randomness = dict(seed=0)
    return cfg


def train_losses(cfg: Config, work_dir: Path, backend: Optional[str] = None) -> Dict[int, float]:
    """Run tools/train.py in this process, compiled with dynamo ``backend`` if given
    (``--cfg-options compile.backend=...``, as a user writes it); return the logged loss per
    iteration, read from the run's text log (a second run in one process writes its
    ``vis_data`` into the first run's folder: mmengine's visualizer is a global instance)."""
    train = load_tool('tools/train.py')
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    config = dump(cfg, work_dir.with_suffix('.py'))
    argv = [str(config), '--work-dir', str(work_dir)]
    if backend is not None:
        argv += ['--cfg-options', f'compile.backend={backend}']
    torch._dynamo.reset()
    try:
        train.main(argv)
    finally:
        torch._dynamo.reset()
    (log,) = work_dir.glob('*/*.log')
    return {int(i): float(loss) for i, loss in
            re.findall(r'Iter\(train\) \[\s*(\d+)/\d+\].*?  loss: ([0-9.e+-]+)', log.read_text())}


def test_compile_option_is_checked_and_chooses_the_hooks(tmp_path):
    seg = tiny_upernet_config(tmp_path, 'MAFormer', iters=1, checkpoint_interval=1)
    for bad, message in [('yes', "compile='yes'; allowed values: True, False or a dict"),
                         (dict(backend='eager', fullgrph=True), "unknown key(s) ['fullgrph']")]:
        seg.compile = bad
        with pytest.raises(ValueError) as error:
            configure_compile(seg)
        assert message in str(error.value) and 'backend' in str(error.value)
    seg.compile = False
    before = seg.custom_hooks.copy()
    configure_compile(seg)
    assert seg.custom_hooks == before
    seg.compile = True
    configure_compile(seg)
    assert [h['type'] for h in seg.custom_hooks].count('EagerOptimizerHook') == 1
    assert seg.compile is True  # a segmentor's whole train_step: mmengine compiles it

    det = tiny_mask_rcnn_config(tmp_path, 'MAFormer', iters=1)
    det.compile = dict(backend='eager', dynamic=False)
    configure_compile(det)
    assert det.compile is None
    assert det.custom_hooks[-1] == dict(type='CompileModulesHook', modules=['backbone', 'neck'],
                                        backend='eager', dynamic=False)


def _mmengine_optim_wrapper(model: torch.nn.Module):
    """AdamW from mmengine's constructor with a paramwise option: ``ConfigDict`` groups."""
    return build_optim_wrapper(model, ConfigDict(
        optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
        paramwise_cfg=dict(norm_decay_mult=0.0)))


def test_eager_optimizer_hook_keeps_the_step_out_of_the_graph():
    """A compiled train step (forward + ``update_params``) with an lr that changes every
    iteration: with the hook it compiles once and trains as eager does; without it dynamo fails
    on mmengine's ``ConfigDict`` parameter groups."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        return model, _mmengine_optim_wrapper(model)

    def train(model, wrapper, step) -> None:
        for i in range(3):
            for group in wrapper.optimizer.param_groups:
                group['lr'] = 1e-3 * (i + 1)  # what a warm-up or poly scheduler does
            step(model, wrapper, torch.ones(2, 3, 6, 6) * i)

    def step(model, wrapper, x) -> None:
        wrapper.update_params(model(x).square().mean())

    model, wrapper = make()
    assert all(isinstance(group, ConfigDict) for group in wrapper.optimizer.param_groups)
    train(model, wrapper, step)
    expected = model.state_dict()

    torch._dynamo.reset()
    model, wrapper = make()
    with pytest.raises(Exception, match="has no attribute 'items'"):
        train(model, wrapper, torch.compile(step, backend='eager'))

    torch._dynamo.reset()
    model, wrapper = make()

    class Runner:
        optim_wrapper = wrapper

    EagerOptimizerHook().before_train(Runner)
    torch._dynamo.utils.counters.clear()
    train(model, wrapper, torch.compile(step, backend='eager'))
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1  # no recompiles
    torch._dynamo.reset()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)


def test_compile_modules_hook_names_bad_modules():
    with pytest.raises(ValueError, match=r"modules='backbone': expected a non-empty list"):
        CompileModulesHook(modules='backbone')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mdoe'\]"):
        CompileModulesHook(mdoe='max-autotune')

    class Runner:
        model = torch.nn.Sequential()
    Runner.model.add_module('backbone', torch.nn.Identity())
    with pytest.raises(ValueError, match=r"names \['neck'\], which the model does not have; "
                                         r"allowed: \['backbone'\]"):
        CompileModulesHook(modules=['backbone', 'neck']).before_train(Runner)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('task', ['seg', 'det'])
def test_compiled_training_equals_eager(tmp_path, task, family):
    """tools/train.py with ``--cfg-options compile.backend=eager``: dynamo captures the step
    (segmentor: whole train_step with the optimizer; detector: backbone and neck) and the first
    iterations' losses equal eager training's."""
    make = tiny_upernet_config if task == 'seg' else tiny_mask_rcnn_config
    extra = dict(checkpoint_interval=ITERS) if task == 'seg' else {}
    cfg = make(tmp_path, family, ITERS, **extra)
    eager = train_losses(cfg.copy(), tmp_path / 'eager')
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = train_losses(cfg.copy(), tmp_path / 'compiled', backend='eager')
    graphs, breaks = counters['stats']['unique_graphs'], sum(counters['graph_break'].values())
    assert (graphs, breaks) == COMPILED_STEP[task], dict(counters['graph_break'])
    assert sorted(compiled) == sorted(eager) == list(range(1, ITERS + 1))
    for i in eager:
        assert compiled[i] == pytest.approx(eager[i], rel=1e-5)


def test_compiled_training_on_two_processes(tmp_path):
    """tools/dist_train.sh (2 processes, gloo, DDP) with ``compile.backend=eager``: mmengine
    compiles the DDP wrapper's train_step; the losses equal the eager 2-process run's."""
    cfg = tiny_upernet_config(tmp_path, 'MAFormer', ITERS, checkpoint_interval=ITERS)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    config = dump(cfg, tmp_path / 'tiny.py')
    losses = {}
    for name, extra in [('eager', []), ('compiled', ['--cfg-options', 'compile.backend=eager'])]:
        proc, log = _run_script('dist_train.sh', config, '2', '--work-dir', tmp_path / name,
                                *extra)
        assert proc.returncode == 0, log
        losses[name] = logged_losses(tmp_path / name)
    assert sorted(losses['eager']) == list(range(1, ITERS + 1))
    assert losses['compiled'] == pytest.approx(losses['eager'], rel=1e-5)
