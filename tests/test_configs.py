"""Every config under configs/ loads, states its settings, builds its model, and runs one train
step and one test step on toy data (backbone and heads shrunk through config overrides)."""
import copy
import math
import re
from functools import cache

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DATASETS, MODELS, DefaultScope

from mmvit_plugins.utils.runtime import (
    config_scope,
    configure_amp,
    register_scope,
    replace_sync_bn,
)

from .helpers import ROOT, load_tool

CONFIGS = sorted(p for p in (ROOT / 'configs').glob('*.py'))
SEG_CONFIGS = [p for p in CONFIGS if p.name.startswith('upernet_')]
DET_CONFIGS = [p for p in CONFIGS if p.name.startswith('mask_rcnn_')]
# Another recipe for a preset that has its three configs (same backbone, other optimizer).
LAYER_DECAY = ROOT / 'configs' / 'upernet_refiner_vit_s_layer_decay_ade20k.py'
TOY_SIZE = 64

# Small custom archs (one per backbone type) for the step tests: same code paths, few channels.
TINY_ARCHS = {
    'BOATSwin': dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
    'BOATCSWin': dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                      split_sizes=(1, 2, 7, 7)),
    'MAFormer': dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    'RefinerViT': dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2.),
}


toy = load_tool('tools/misc/make_toy_dataset.py')


@pytest.fixture(scope='module')
def toy_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp('toy')
    return dict(
        seg=toy.make_seg_toy(str(base / 'ade'), num_train=2, num_val=1, size=TOY_SIZE),
        det=toy.make_det_toy(str(base / 'coco'), num_train=2, num_val=1, size=TOY_SIZE))


def _backbone_class(type_name: str) -> type:
    """The registered class of a config's backbone; an unregistered one fails the test."""
    import mmvit_plugins  # noqa: F401
    cls = MODELS.get(type_name)
    assert cls is not None, (f'backbone type {type_name!r} is not registered; registered '
                             f"backbones of mmvit_plugins: {sorted(TINY_ARCHS)}")
    return cls


def test_an_unregistered_backbone_fails():
    """A config naming a backbone that the package does not register fails its tests."""
    with pytest.raises(AssertionError, match="'NoSuchBackbone' is not registered"):
        _backbone_class('NoSuchBackbone')


@cache
def _loaded(path) -> Config:
    """A config as loaded from its file, shared by the tests that only read it."""
    return Config.fromfile(str(path))


@cache
def _full_widths(type_name: str, arch: str):
    """The preset's output widths, from a build with the fewest blocks (widths do not depend on
    depth)."""
    cls = _backbone_class(type_name)
    preset = dict(cls.arch_zoo[arch])
    if 'depths' in preset:
        preset['depths'] = [1] * len(preset['depths'])
    if 'num_layers' in preset:
        preset['num_layers'] = 2
    return list(cls(arch=preset).num_features)


def test_every_backbone_has_configs():
    """Adding a backbone preset means adding its three config files."""
    stems = {p.name[len('upernet_'):-len('_ade20k.py')] for p in SEG_CONFIGS
             if p.name.endswith('_ade20k.py') and p != LAYER_DECAY}  # no *_amp.py variants
    assert stems, 'no UperNet configs found'
    for stem in stems:
        for sched in ('1x', 'ms_3x'):
            assert (ROOT / 'configs' / f'mask_rcnn_{stem}_fpn_{sched}_coco.py').is_file(), stem
    assert (ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k.py').is_file()


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=lambda p: p.stem)
def test_seg_config_settings(path):
    cfg = _loaded(path)
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports['imports'] == ['mmvit_plugins']
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    assert cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.val_evaluator.iou_metrics == ['mIoU']
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    if path != LAYER_DECAY:
        assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.
    assert [s.type for s in cfg.param_scheduler] == ['LinearLR', 'PolyLR']
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    assert cfg.auto_scale_lr.base_batch_size == 8 * cfg.train_dataloader.batch_size
    assert cfg.tta_model.type == 'SegTTAModel'
    resizes, flips, *_ = cfg.tta_pipeline[1].transforms
    assert [t.scale_factor for t in resizes] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert sorted(t.prob for t in flips) == [0., 1.]
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    backbone = cfg.model.backbone
    widths = _full_widths(backbone.type, backbone.arch)
    assert cfg.model.decode_head.in_channels == widths
    assert cfg.model.auxiliary_head.in_channels == widths[2]


@pytest.mark.parametrize('path', DET_CONFIGS, ids=lambda p: p.stem)
def test_det_config_settings(path):
    cfg = _loaded(path)
    assert cfg.default_scope == 'mmdet'
    assert cfg.custom_imports['imports'] == ['mmvit_plugins']
    assert cfg.model.type == 'MaskRCNN'
    assert cfg.train_cfg.max_epochs == (36 if '_ms_3x_' in path.name else 12)
    assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    assert cfg.auto_scale_lr.base_batch_size == 8 * cfg.train_dataloader.batch_size
    assert cfg.tta_model.type == 'DetTTAModel' and cfg.tta_model.tta_cfg.max_per_img == 100
    resizes, flips, *_ = cfg.tta_pipeline[1].transforms
    assert [t.scale for t in resizes] == [(1333, 800), (666, 400), (2000, 1200)]
    assert sorted(t.prob for t in flips) == [0., 1.]
    if '_ms_3x_' in path.name:
        assert 'RandomChoice' in [t.type for t in cfg.train_dataloader.dataset.pipeline]
    backbone = cfg.model.backbone
    assert cfg.model.neck.in_channels == _full_widths(backbone.type, backbone.arch)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def test_configs_name_no_url():
    """No config makes a run download anything: the backbone checkpoints are local files under
    checkpoints/ and ``load_from`` is unset (a URL given by the user is downloaded)."""
    for path in CONFIGS:
        cfg = _loaded(path)
        urls = [s for s in _strings(cfg.to_dict()) if '://' in s]
        assert urls == [], (path.name, urls)
        init_cfg = cfg.model.backbone.get('init_cfg')
        if init_cfg is not None:
            assert init_cfg.checkpoint.startswith('checkpoints/'), path.name
        assert cfg.get('load_from') is None, path.name


def test_layer_decay_config_lrs():
    """Refiner-ViT-S's 16 blocks at lr x 0.75 ** (16 - i), embeddings at lr x 0.75 ** 17, the
    rest at lr; built from the config on the full-size backbone."""
    cfg = _loaded(LAYER_DECAY)
    backbone_cfg = dict(cfg.model.backbone, init_cfg=None)
    assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    num_layers = MODELS.get(backbone_cfg['type']).arch_zoo[backbone_cfg['arch']]['num_layers']
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=num_layers, layer_decay_rate=0.75)
    model = torch.nn.Module()
    model.backbone = MODELS.build(backbone_cfg)
    model.decode_head = torch.nn.Conv2d(4, 2, 1)
    groups = {name: group for group in build_optim_wrapper(model, cfg.optim_wrapper)
              .optimizer.param_groups for name in group['param_names']}
    lr = cfg.optim_wrapper.optimizer.lr
    assert groups['backbone.patch_embed.proj.weight']['lr'] == pytest.approx(lr * 0.75**17)
    assert groups[f'backbone.blocks.{num_layers - 1}.mlp.fc1.weight']['lr'] == \
        pytest.approx(lr * 0.75)
    assert groups['decode_head.weight']['lr'] == pytest.approx(lr)
    assert groups['decode_head.bias']['weight_decay'] == 0.
    assert groups['decode_head.weight']['weight_decay'] == cfg.optim_wrapper.optimizer.weight_decay


def test_model_index_lists_every_config_once_as_it_is():
    """model-index.yml (openmim) names each config once, with its task and dataset, the
    paper's number exactly where the config's docstring quotes one, and its backbone
    checkpoint; the upstream weights it names are in docs/model_zoo.md."""
    import modelindex  # installed with openmim (requirements/tests.txt)
    index = modelindex.load(str(ROOT / 'model-index.yml'))
    assert index.check(silent=True) == []
    models = {model.name: model for model in index.models}
    assert len(models) == len(index.models) and set(models) == {p.stem for p in CONFIGS}
    zoo = (ROOT / 'docs' / 'model_zoo.md').read_text()
    for path in CONFIGS:
        model, cfg = models[path.stem], _loaded(path)
        assert model.config == f'configs/{path.name}'
        (result, ) = model.results
        seg = config_scope(cfg) == 'mmseg'
        assert (result.task, result.dataset) == (('Semantic Segmentation', 'ADE20K') if seg
                                                 else ('Instance Segmentation', 'COCO'))
        quoted = re.search(r'Paper: ([\d.]+) mIoU', path.read_text())
        assert result.metrics == ({'mIoU': float(quoted.group(1))} if quoted else {}), path.name
        init_cfg = cfg.model.backbone.get('init_cfg')
        meta = model.metadata.data
        assert meta.get('Backbone Checkpoint') == (init_cfg.checkpoint if init_cfg else None)
        if 'Pretrained Weights URL' in meta:
            assert meta['Pretrained Weights URL'] in zoo, path.name


def _shrink(cfg: Config, scope: str) -> None:
    """A tiny backbone arch of the same type; heads with a few channels."""
    backbone = cfg.model.backbone
    backbone.arch = copy.deepcopy(TINY_ARCHS[backbone.type])
    backbone.init_cfg = None
    kwargs = {k: v for k, v in backbone.items() if k != 'type'}
    widths = list(_backbone_class(backbone.type)(**kwargs).num_features)
    model = cfg.model
    if scope == 'mmseg':
        model.decode_head.update(in_channels=widths, channels=16)
        model.auxiliary_head.update(in_channels=widths[2], channels=8)
    else:
        model.neck.update(in_channels=widths, out_channels=16)
        model.rpn_head.update(in_channels=16, feat_channels=16)
        roi = model.roi_head
        roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = 16
        roi.bbox_head.update(in_channels=16, fc_out_channels=32)
        roi.mask_head.update(in_channels=16, conv_out_channels=16)


def _finite_loss(log_vars) -> bool:
    return all(math.isfinite(float(v)) for v in log_vars.values())


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_train_and_test_step(path, toy_roots):
    cfg = Config.fromfile(str(path))
    scope = config_scope(cfg)
    _backbone_class(cfg.model.backbone.type)
    task = 'seg' if scope == 'mmseg' else 'det'
    toy.toy_overrides(cfg, task, str(toy_roots[task]), TOY_SIZE)
    replace_sync_bn(cfg.model)  # CPU: as tools/train.py does without CUDA
    register_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        _shrink(cfg, scope)
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        configure_amp(cfg)  # CPU: the AMP variants' AmpOptimWrapper becomes CPUAmpOptimWrapper
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        train_set = DATASETS.build(cfg.train_dataloader.dataset)
        test_set = DATASETS.build(cfg.test_dataloader.dataset)

        model.train()
        log_vars = model.train_step(pseudo_collate([train_set[0], train_set[1]]), optim_wrapper)
        assert log_vars and _finite_loss(log_vars), log_vars

        model.eval()
        with torch.no_grad():
            (result, ) = model.test_step(pseudo_collate([test_set[0]]))
    if scope == 'mmseg':
        assert tuple(result.pred_sem_seg.data.shape) == (1, TOY_SIZE, TOY_SIZE)
    else:
        instances = result.pred_instances
        assert instances.bboxes.shape[-1] == 4
        assert len(instances.masks) == len(instances.bboxes) == len(instances.scores)
