"""The toy datasets: seeded, idempotent, in ADE20K / COCO layout, loadable by mmseg/mmdet, and
the config adaptation that points a full-size config at them."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import DATASETS, MODELS, DefaultScope

from mmvit_plugins.utils.runtime import register_scope

from .helpers import ROOT, load_tool

toy = load_tool('tools/misc/make_toy_dataset.py')


def _files(root: Path):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_seg_toy_layout_and_labels(tmp_path):
    root = toy.make_seg_toy(str(tmp_path / 'ade'), num_train=6, num_val=2, size=64)
    for split, count in (('training', 6), ('validation', 2)):
        images = sorted((root / 'images' / split).glob('*.jpg'))
        labels = sorted((root / 'annotations' / split).glob('*.png'))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
    values = set()
    for path in (root / 'annotations' / 'training').glob('*.png'):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert label.shape == (64, 64) and label.dtype == np.uint8
        values |= set(np.unique(label).tolist())
    assert values <= {1, 2, 3, 4, 5} and 1 in values and len(values) >= 3


def test_toy_sets_are_seeded_and_idempotent(tmp_path):
    a = toy.make_seg_toy(str(tmp_path / 'a'), num_train=3, num_val=1, size=48, seed=7)
    b = toy.make_seg_toy(str(tmp_path / 'b'), num_train=3, num_val=1, size=48, seed=7)
    assert _files(a) == _files(b)
    stamp = a / 'toy_dataset.json'
    before = {p: p.stat().st_mtime_ns for p in a.rglob('*') if p.is_file()}
    toy.make_seg_toy(str(a), num_train=3, num_val=1, size=48, seed=7)
    assert before == {p: p.stat().st_mtime_ns for p in a.rglob('*') if p.is_file()}
    c = toy.make_seg_toy(str(tmp_path / 'c'), num_train=3, num_val=1, size=48, seed=8)
    assert _files(a) != _files(c)
    assert json.loads(stamp.read_text())['seed'] == 7


def test_det_toy_is_valid_coco(tmp_path):
    from pycocotools.coco import COCO
    root = toy.make_det_toy(str(tmp_path / 'coco'), num_train=4, num_val=2, size=96)
    for split, count in (('train', 4), ('val', 2)):
        coco = COCO(str(root / 'annotations' / f'instances_{split}.json'))
        assert len(coco.getImgIds()) == count
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(toy.TOY_DET_CLASSES)
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann['bbox']
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert ann['area'] > 0 and w > 0 and h > 0
            assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1
            assert ys.max() <= y + h
            assert (root / split / coco.loadImgs(ann['image_id'])[0]['file_name']).is_file()


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match='num_train'):
        toy.make_seg_toy(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match='size'):
        toy.make_det_toy(str(tmp_path), size=8)
    with pytest.raises(ValueError, match='task'):
        toy.toy_overrides(Config(), 'cls', str(tmp_path), 64)


def test_toy_overrides_seg_config_loads_data(tmp_path):
    root = toy.make_seg_toy(str(tmp_path / 'ade'), num_train=2, num_val=1, size=64)
    cfg = Config.fromfile(str(ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k.py'))
    changes = toy.toy_overrides(cfg, 'seg', str(root), 64, crop_size=48)
    assert any('crop_size=(48, 48)' in c for c in changes)
    assert cfg.model.data_preprocessor.size == (48, 48)
    pipeline = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    assert pipeline['RandomResize']['scale'] == (256, 64)
    assert pipeline['RandomCrop']['crop_size'] == (48, 48)
    register_scope('mmseg')
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        val = DATASETS.build(cfg.val_dataloader.dataset)
        preprocessor = MODELS.build(cfg.model.data_preprocessor)
    # A random down-scale may leave the image smaller than the crop; the preprocessor pads it.
    items = [dataset[i % len(dataset)] for i in range(4)]
    assert all(max(item['inputs'].shape[1:]) <= 48 for item in items)
    batch = preprocessor(dict(inputs=[i['inputs'] for i in items],
                              data_samples=[i['data_samples'] for i in items]), training=True)
    assert tuple(batch['inputs'].shape) == (4, 3, 48, 48)
    assert len(val) == 1


def test_toy_overrides_det_config_loads_data(tmp_path):
    root = toy.make_det_toy(str(tmp_path / 'coco'), num_train=2, num_val=1, size=80)
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mask_rcnn_boat_swin_t_fpn_1x_coco.py'))
    toy.toy_overrides(cfg, 'det', str(root), 80)
    assert cfg.model.roi_head.bbox_head.num_classes == len(toy.TOY_DET_CLASSES)
    assert cfg.test_evaluator.ann_file == str(root / 'annotations' / 'instances_val.json')
    register_scope('mmdet')
    with DefaultScope.overwrite_default_scope('mmdet'):
        train_set = DATASETS.build(cfg.train_dataloader.dataset)
        item = train_set[0]
    assert train_set.metainfo['classes'] == toy.TOY_DET_CLASSES
    assert len(item['data_samples'].gt_instances) > 0
    assert max(item['inputs'].shape[1:]) <= 80 * 1333 // 800 + 1
    resizes = cfg.tta_pipeline[1]['transforms'][0]
    assert [r['scale'] for r in resizes] == [(133, 80), (67, 40), (200, 120)]


def test_toy_overrides_scale_nested_multiscale_pipeline(tmp_path):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mask_rcnn_boat_swin_t_fpn_ms_3x_coco.py'))
    toy.toy_overrides(cfg, 'det', str(tmp_path), 80)
    choice = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}['RandomChoice']
    single, crop_branch = choice['transforms']
    assert single[0]['scales'][0] == (48, 133) and single[0]['scales'][-1] == (80, 133)
    assert crop_branch[1]['crop_size'] == (38, 60)


@pytest.mark.parametrize('config,key,expected', [
    ('upernet_boat_cswin_t_ade20k.py', 'depths', [1, 2, 2, 1]),
    ('upernet_maformer_t_ade20k.py', 'depths', [2, 2, 2, 2]),
    ('upernet_refiner_vit_s_ade20k.py', 'num_layers', 4),
])
def test_demo_shrinks_every_family(config, key, expected):
    """tools/misc/demo.py's shrunk model: at most 2 blocks per stage (a plain ViT: 4 blocks),
    the preset's widths and heads kept, and the model builds."""
    import mmvit_plugins  # noqa: F401  (registers the backbones)
    demo = load_tool('tools/misc/demo.py')
    cfg = Config.fromfile(str(ROOT / 'configs' / config))
    name, backbone_type = cfg.model.backbone.arch, cfg.model.backbone.type
    demo.shrink_model(cfg)
    arch = cfg.model.backbone.arch
    preset = MODELS.get(backbone_type).arch_zoo[name]
    assert arch[key] == expected
    assert {k: v for k, v in arch.items() if k != key} == \
        {k: v for k, v in preset.items() if k != key}
    MODELS.build(dict(cfg.model.backbone, init_cfg=None))
