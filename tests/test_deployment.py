"""Deployment with mmdeploy: the exact adaptive pooling, its rewriter, tools/deployment/deploy.py
and test.py (onnxruntime against PyTorch for UperNet and Mask R-CNN with every backbone family
at tiny widths) and their errors on bad input."""
import copy
import os.path as osp
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config, ConfigDict

from mmvit_plugins.deployment import adaptive_bins, exact_adaptive_avg_pool2d

from .conftest import TINY_BACKBONES
from .helpers import ROOT, import_deploy, load_tool

mmdeploy = import_deploy('mmdeploy')
ort = import_deploy('onnxruntime')
onnx = import_deploy('onnx')

DEPLOY = ROOT / 'configs' / 'deploy'
SEG_STATIC = DEPLOY / 'mmseg' / 'segmentation_onnxruntime_static-512x512.py'
SEG_DYNAMIC = DEPLOY / 'mmseg' / 'segmentation_onnxruntime_dynamic.py'
DET_DYNAMIC = DEPLOY / 'mmdet' / 'instance-seg' / 'instance-seg_onnxruntime_dynamic.py'
DET_STATIC = DEPLOY / 'mmdet' / 'instance-seg' / 'instance-seg_onnxruntime_static-800x1344.py'
SEG_BASE = ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'
DET_BASE = ROOT / 'configs' / 'mask_rcnn_maformer_s_fpn_1x_coco.py'
TOY_SIZE = 128  # tools/misc/demo.py's toy images
FAMILIES = sorted(TINY_BACKBONES)
# mmseg's own Swin-T at tiny widths: the reference UperNet of the issue.
MMSEG_SWIN = dict(type='mmseg.SwinTransformer', embed_dims=16, depths=(1, 1, 1, 1),
                  num_heads=(1, 1, 2, 2), window_size=7)
# Input sizes per family at which no window is padded, and one at which windows are padded.
UNPADDED = {'BOATSwin': 224, 'BOATCSWin': 224, 'MAFormer': 224, 'RefinerViT': 128}
PADDED = 160
NUM_DET_CLASSES = 3
# Mask pixels compared where PyTorch's probability is this far from the threshold 0.5 (its
# masks come as uint8 probability x 255: 1/255 apart).
MASK_MARGIN = 0.02

deploy_tool = load_tool('tools/deployment/deploy.py')
test_tool = load_tool('tools/deployment/test.py')


# -- the deploy configs -------------------------------------------------------------------------
@pytest.mark.parametrize('path,codebase,shape,dynamic', [
    (SEG_STATIC, 'mmseg', [512, 512], False), (SEG_DYNAMIC, 'mmseg', None, True),
    (DET_STATIC, 'mmdet', [1344, 800], False), (DET_DYNAMIC, 'mmdet', None, True)])
def test_deploy_configs(path, codebase, shape, dynamic):
    """mmdeploy's names and format, self-contained (their _base_ files are ours)."""
    from mmdeploy.utils import get_input_shape, is_dynamic_shape, load_config
    cfg = load_config(str(path))[0]
    assert cfg.backend_config.type == 'onnxruntime' and cfg.codebase_config.type == codebase
    assert cfg.onnx_config.save_file == 'end2end.onnx' and cfg.onnx_config.opset_version >= 16
    input_shape = get_input_shape(cfg)
    assert (None if input_shape is None else list(input_shape)) == shape
    assert is_dynamic_shape(cfg) == dynamic
    if codebase == 'mmdet':
        assert cfg.onnx_config.output_names == ['dets', 'labels', 'masks']


# -- the exact pooling --------------------------------------------------------------------------
@pytest.mark.parametrize('size,out', [((16, 16), (3, 3)), ((16, 16), (6, 6)), ((4, 4), (6, 6)),
                                      ((7, 13), (3, 5)), ((33, 21), (2, 1)), ((5, 9), (5, 9)),
                                      ((32, 24), (None, 4))])
def test_exact_pooling_equals_pytorch(size, out):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(exact_adaptive_avg_pool2d(x, out), F.adaptive_avg_pool2d(x, out),
                               rtol=0, atol=1e-12)


def test_adaptive_bins_rows_average_each_bin():
    bins = adaptive_bins(10, 3)  # PyTorch's bins of 10 -> 3: rows 0-3, 3-6, 6-9
    assert torch.equal(bins > 0, torch.tensor([[1] * 4 + [0] * 6, [0] * 3 + [1] * 4 + [0] * 3,
                                               [0] * 6 + [1] * 4]).bool())
    torch.testing.assert_close(bins.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match='out_size'):
        adaptive_bins(10, 0)


class _Pool(torch.nn.Module):

    def forward(self, x):
        return torch.cat([exact_adaptive_avg_pool2d(x, s).flatten(2) for s in (2, 3, 6)], 2)


def test_exact_pooling_exports_with_dynamic_sizes(tmp_path):
    """One export (traced at 16x16) computes the bins of every size it runs at."""
    path = str(tmp_path / 'pool.onnx')
    torch.onnx.export(_Pool(), torch.randn(1, 4, 16, 16), path, opset_version=11,
                      input_names=['x'], output_names=['y'],
                      dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for size in ((16, 16), (12, 20), (4, 5), (31, 17)):
        x = torch.randn(2, 4, *size)
        expected = torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in (2, 3, 6)], 2)
        got = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_rewriter_replaces_mmdeploys_pooling_for_onnxruntime_only():
    from mmdeploy.core import RewriterContext

    from mmvit_plugins.deployment import rewriters  # noqa: F401
    x = torch.randn(1, 2, 16, 16)
    exact, exact3 = F.adaptive_avg_pool2d(x, 6), F.adaptive_avg_pool2d(x, 3)
    cfg = Config(dict(backend_config=dict(type='onnxruntime'),
                      onnx_config=dict(type='onnx', input_shape=None)))
    with RewriterContext(cfg=cfg, backend='onnxruntime'):
        torch.testing.assert_close(F.adaptive_avg_pool2d(x, 6), exact, rtol=0, atol=1e-6)
        torch.testing.assert_close(F.adaptive_avg_pool2d(x, 1), x.mean((2, 3), keepdim=True))
    with RewriterContext(cfg=cfg, backend='tensorrt'):  # mmdeploy's: kernel = stride = 16 // 3
        wrong = F.adaptive_avg_pool2d(x, 3)
        assert wrong.shape == (1, 2, 3, 3)
        assert not torch.allclose(wrong, exact3, atol=1e-3)
    assert torch.equal(F.adaptive_avg_pool2d(x, 6), exact)  # restored after the context


def _rewriter_cfg(codebase: str = 'mmseg', opset: int = 17) -> Config:
    return Config(dict(backend_config=dict(type='onnxruntime'),
                       onnx_config=dict(type='onnx', input_shape=None, opset_version=opset),
                       codebase_config=dict(type=codebase)))


@pytest.mark.parametrize('opset', [11, 17])
def test_attention_rewriter_keeps_pytorchs_semantics(opset):
    """mmdeploy's default rewrite divides by an explicit ``scale`` (BOAT's FSLA passes
    d ** -0.5); the onnxruntime rewrite keeps PyTorch's numbers: torch's symbolic from opset 14,
    a decomposition below."""
    from mmdeploy.core import RewriterContext

    from mmvit_plugins.deployment import rewriters  # noqa: F401
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    float_mask = torch.randn(5, 5)
    bool_mask = torch.rand(2, 1, 5, 5) > 0.3
    bool_mask[..., 0] = True  # no query without keys
    calls = [dict(), dict(scale=0.125), dict(attn_mask=float_mask, scale=0.3),
             dict(attn_mask=bool_mask), dict(is_causal=True)]
    expected = [F.scaled_dot_product_attention(q, k, v, **kw) for kw in calls]
    with RewriterContext(cfg=_rewriter_cfg(opset=opset), backend='onnxruntime', opset=opset):
        for kw, ref in zip(calls, expected):
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, **kw), ref)
    with RewriterContext(cfg=_rewriter_cfg(opset=opset), backend='tensorrt', opset=opset):
        wrong = F.scaled_dot_product_attention(q, k, v, scale=0.125)  # mmdeploy's: q k^T / 0.125
    assert not torch.allclose(wrong, expected[1], atol=1e-3)


class _OffsetNMS(torch.nn.Module):

    def forward(self, boxes, scores, groups, valid):
        from mmvit_plugins.deployment.detection import offset_nms
        return offset_nms(boxes, scores, groups, valid, 40, 0.5, 0.1, -1.0)


def test_offset_nms_equals_mmdets_batched_nms(tmp_path):
    """NMS within each group, dropped entries never kept, the 40 best in descending score order,
    padding rows: in PyTorch and as an ONNX graph of any number of boxes under onnxruntime."""
    from mmcv.ops import batched_nms
    from mmdeploy.core import RewriterContext

    def inputs(num, seed):
        gen = torch.Generator().manual_seed(seed)
        xy = torch.rand(2, num, 2, generator=gen) * 100
        wh = torch.rand(2, num, 2, generator=gen) * 40
        wh[:, :num // 10] = 0  # empty boxes, dropped as mmdet's RPN does
        scores = torch.rand(2, num, generator=gen)
        valid = (wh > 0).all(-1) & (scores > 0.1)
        valid[1] = False if num < 100 else valid[1]  # an image without any box kept
        return (torch.cat([xy, xy + wh], -1), scores, torch.randint(0, 4, (2, num), generator=gen),
                valid)

    def check(dets, inds, boxes, scores, groups, valid):
        for b in range(2):
            candidates = valid[b].nonzero()[:, 0]
            if len(candidates):
                ref, keep = batched_nms(boxes[b, candidates], scores[b, candidates],
                                        groups[b, candidates], dict(type='nms', iou_threshold=0.5))
                ref, keep = ref[:40], candidates[keep[:40]]
            else:
                ref, keep = boxes.new_zeros(0, 5), candidates
            n = len(keep)
            assert torch.equal(inds[b, :n], keep)
            torch.testing.assert_close(dets[b, :n], ref)
            assert (inds[b, n:] == -1).all() and (dets[b, n:, 4] == -1).all()
            assert (dets[b, n:, :4] == 0).all()

    path = str(tmp_path / 'nms.onnx')
    cfg = _rewriter_cfg('mmdet')
    with RewriterContext(cfg=cfg, backend='onnxruntime', opset=17):
        for num, seed in ((300, 0), (50, 1)):
            data = inputs(num, seed)
            check(*_OffsetNMS()(*data), *data)
        torch.onnx.export(_OffsetNMS(), inputs(300, 0), path, opset_version=17,
                          input_names=['boxes', 'scores', 'groups', 'valid'],
                          output_names=['dets', 'inds'],
                          dynamic_axes={name: {1: 'num'} for name in
                                        ('boxes', 'scores', 'groups', 'valid')})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for num, seed in ((300, 2), (1000, 3), (50, 4)):
        data = inputs(num, seed)
        feed = dict(zip(('boxes', 'scores', 'groups', 'valid'), (t.numpy() for t in data)))
        dets, inds = (torch.from_numpy(out) for out in session.run(None, feed))
        check(dets, inds, *data)


def test_import_does_not_need_mmdeploy_and_registers_with_it():
    code = ('import sys, mmvit_plugins; assert "mmdeploy" not in sys.modules; '
            'assert "mmvit_plugins.deployment.rewriters" not in sys.modules; '
            'import mmdeploy.core; import importlib; importlib.reload(mmvit_plugins); '
            'assert "mmvit_plugins.deployment.rewriters" in sys.modules; print("ok")')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


# -- models at tiny widths ----------------------------------------------------------------------
def _widths(backbone: dict):
    from mmengine.registry import MODELS

    import mmvit_plugins  # noqa: F401
    if backbone['type'] == 'mmseg.SwinTransformer':
        return [backbone['embed_dims'] * 2**i for i in range(4)]
    return list(MODELS.build(dict(backbone, init_cfg=None)).num_features)


def _set_test_size(cfg: Config, size) -> None:
    """Test images of ``size`` (H, W) go into the model unresized."""
    for pipeline in (cfg.test_pipeline, cfg.test_dataloader.dataset.pipeline):
        for transform in pipeline:
            if transform['type'] == 'Resize':
                transform.update(scale=(size[1], size[0]), keep_ratio=True)


def _seg_config(backbone: dict, size) -> Config:
    cfg = Config.fromfile(str(SEG_BASE))
    widths = _widths(backbone)
    cfg.model.backbone = ConfigDict(backbone, init_cfg=None)
    cfg.model.decode_head.update(in_channels=widths, channels=16)
    cfg.model.auxiliary_head.update(in_channels=widths[2], channels=8)
    _set_test_size(cfg, size)
    return cfg


def _det_config(backbone: dict, size, widths=None) -> Config:
    cfg = Config.fromfile(str(DET_BASE))
    cfg.model.backbone = ConfigDict(backbone, init_cfg=None)
    cfg.model.neck.update(in_channels=widths or _widths(backbone), out_channels=16)
    cfg.model.rpn_head.update(in_channels=16, feat_channels=16)
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = 16
    # Several classes and Mask R-CNN's own test_cfg: the exported post-processing (NMS per FPN
    # level, each class's own box, NMS per class) is compared with mmdet's as it is.
    roi.bbox_head.update(in_channels=16, fc_out_channels=32, num_classes=NUM_DET_CLASSES)
    roi.mask_head.update(in_channels=16, conv_out_channels=16, num_classes=NUM_DET_CLASSES)
    _set_test_size(cfg, size)
    return cfg


def _write(tmp_path, cfg: Config, size, seed: int = 0):
    """The config, a checkpoint of its randomly initialised model and a test image."""
    import cv2
    from mmengine.registry import DefaultScope

    from mmvit_plugins.utils.runtime import register_scope, replace_sync_bn
    cfg = copy.deepcopy(cfg)
    replace_sync_bn(cfg.model)
    register_scope(cfg.default_scope)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        from mmengine.registry import MODELS
        model = MODELS.build(cfg.model)
    config, checkpoint = tmp_path / 'model.py', tmp_path / 'model.pth'
    cfg.dump(str(config))
    torch.save({'state_dict': model.state_dict()}, str(checkpoint))
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (size[0] // 16 + 1, size[1] // 16 + 1, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    image_path = tmp_path / 'image.png'
    cv2.imwrite(str(image_path), image)
    return str(config), str(checkpoint), str(image_path)


def _deploy(tmp_path, deploy_cfg, cfg: Config, size):
    config, checkpoint, image = _write(tmp_path, cfg, size)
    work_dir = tmp_path / 'work'
    result = deploy_tool.main([str(deploy_cfg), config, checkpoint, image, '--work-dir',
                               str(work_dir)])
    return dict(result, files=(str(deploy_cfg), config, checkpoint, image))


def _assert_segmentation_agrees(result) -> None:
    agreement = result['agreement']
    assert agreement['equal_pixels'] >= 0.999, agreement
    assert agreement['max_logit_diff'] < 1e-3, agreement


def _assert_detections_match(result) -> None:
    agreement = result['agreement']
    assert agreement['reference'] > 0, 'the PyTorch model detected nothing: nothing compared'
    assert agreement['matched'] == agreement['reference'] == agreement['detections'], agreement
    assert agreement['min_iou'] > 0.99 and agreement['max_score_diff'] < 1e-3, agreement


def _assert_masks_agree(result, margin: float = MASK_MARGIN) -> float:
    """The exported model's pasted masks equal the PyTorch model's wherever PyTorch's mask
    probability is more than ``margin`` from mmdet's threshold 0.5 (nearer, a difference of
    1e-6 in a logit can flip a pixel: the tiny MAFormer's masks at 224x224 then agree with an
    IoU of 0.67 only); returns the share of the mask pixels that this compares."""
    from mmdeploy.apis import build_task_processor
    from mmdeploy.utils import get_input_shape
    from mmdet.structures.bbox import bbox_overlaps

    from mmvit_plugins.checkpoint import safe_mmengine_loading
    from mmvit_plugins.deployment.utils import load_deploy_configs
    deploy_cfg, config, checkpoint, image = result['files']
    deploy, model_cfg = load_deploy_configs(deploy_cfg, config)
    processor = build_task_processor(model_cfg, deploy, 'cpu')
    with safe_mmengine_loading():
        torch_model = processor.build_pytorch_model(checkpoint)
    backend = processor.build_backend_model(
        [result['onnx']], data_preprocessor_updater=processor.update_data_preprocessor)
    data, _ = processor.create_input(image, get_input_shape(deploy))
    torch_model.roi_head.test_cfg.mask_thr_binary = -1  # masks: probability x 255, as uint8
    with torch.no_grad():
        (reference, ) = torch_model.test_step(copy.deepcopy(data))
        (exported, ) = backend.test_step(copy.deepcopy(data))
    reference, exported = reference.pred_instances, exported.pred_instances
    ious = bbox_overlaps(reference.bboxes, exported.bboxes)
    ious[reference.labels[:, None] != exported.labels[None, :]] = 0
    best, match = ious.max(1)
    assert len(reference) and (best > 0.99).all(), best
    prob = reference.masks.float() / 255
    masks = exported.masks[match].bool()
    away = (prob - 0.5).abs() > margin
    wrong = (masks != (prob >= 0.5)) & away
    assert not wrong.any(), f'{int(wrong.sum())} pixels differ where |p - 0.5| > {margin}'
    foreground = masks | (prob >= 0.5)
    return ((foreground & away).sum() / foreground.sum()).item()


# -- UperNet --------------------------------------------------------------------------------------
@pytest.mark.parametrize('deploy_cfg,size', [(SEG_STATIC, 512), (SEG_DYNAMIC, TOY_SIZE)],
                         ids=['static-512', f'dynamic-{TOY_SIZE}'])
@pytest.mark.parametrize('family', ['mmseg.SwinTransformer'] + FAMILIES)
def test_upernet_onnxruntime_equals_pytorch(tmp_path, family, deploy_cfg, size):
    backbone = MMSEG_SWIN if family == 'mmseg.SwinTransformer' else dict(
        type=family, **TINY_BACKBONES[family])
    result = _deploy(tmp_path, deploy_cfg, _seg_config(backbone, (size, size)), (size, size))
    _assert_segmentation_agrees(result)
    assert result['onnx'].endswith('end2end.onnx')


# -- Mask R-CNN -----------------------------------------------------------------------------------
@pytest.mark.parametrize('padded', [False, True], ids=['unpadded', 'padded'])
@pytest.mark.parametrize('family', FAMILIES)
def test_mask_rcnn_onnxruntime_equals_pytorch(tmp_path, family, padded):
    size = (PADDED, PADDED + 32) if padded else (UNPADDED[family], UNPADDED[family])
    cfg = _det_config(dict(type=family, **TINY_BACKBONES[family]), size)
    result = _deploy(tmp_path, DET_DYNAMIC, cfg, size)
    _assert_detections_match(result)
    # random weights: 57-86 % of the mask pixels are that far from the threshold
    assert _assert_masks_agree(result) > 0.5


def test_mask_rcnn_static_800x1344_and_test_tool(tmp_path):
    """The static config resizes to 800x1344 for the export and, in test.py, for the test set;
    test.py's metrics on the toy set equal those of the PyTorch checkpoint."""
    toy = load_tool('tools/misc/make_toy_dataset.py')
    backbone = dict(type='mmdet.ResNet', depth=18, base_channels=8, num_stages=4,
                    out_indices=(0, 1, 2, 3), norm_eval=True, style='pytorch', init_cfg=None)
    cfg = _det_config(backbone, (800, 1344), widths=[8, 16, 32, 64])
    data_root = toy.make_det_toy(str(tmp_path / 'toy'), num_train=1, num_val=2, size=TOY_SIZE)
    toy.toy_overrides(cfg, 'det', str(data_root), TOY_SIZE, 0)
    result = _deploy(tmp_path, DET_STATIC, cfg, (800, 1344))
    assert result['agreement']['reference'] > 0
    assert result['agreement']['matched'] == result['agreement']['reference']
    shape = onnx.load(result['onnx']).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 3, 800, 1344]
    # Random weights detect none of the toy objects (mAP 0 for both models): the ground truth
    # becomes every other of the PyTorch model's 10 best detections per image.
    cfg = _static_test_config(tmp_path / 'model.py', tmp_path / 'model.pth', (1344, 800),
                              tmp_path / 'pytorch')
    _predictions_as_ground_truth(cfg, Path(data_root) / 'annotations' / 'instances_val.json')
    metrics = test_tool.main([str(DET_STATIC), str(tmp_path / 'model.py'), '--model',
                              result['onnx'], '--work-dir', str(tmp_path / 'test')])
    reference = _pytorch_metrics(cfg)
    assert 0.2 < reference['coco/bbox_mAP'] < 1 and 0.2 < reference['coco/segm_mAP'] < 1, \
        reference
    keys = [k for k in reference if k.startswith(('coco/bbox_mAP', 'coco/segm_mAP'))]
    assert len(keys) == 12 and set(keys) <= set(metrics), (reference, metrics)
    # CocoMetric rounds to 3 decimals: one unit of that rounding.
    assert {k: metrics[k] for k in keys} == pytest.approx({k: reference[k] for k in keys},
                                                          abs=1e-3, rel=0)


def _static_test_config(config, checkpoint, input_shape, work_dir) -> Config:
    """The model config as tools/test.py runs it for the PyTorch checkpoint, with the test
    pipeline resized to the static ``input_shape`` (W, H) as test.py does for the exported
    model."""
    from mmvit_plugins.utils.runtime import prepare_config
    cfg = prepare_config(str(config), None, 'none', str(work_dir))
    assert test_tool.resize_to_input_shape(cfg.test_dataloader.dataset.pipeline, input_shape)
    cfg.load_from = str(checkpoint)
    return cfg


def _pytorch_metrics(cfg: Config) -> dict:
    from mmengine.runner import Runner

    from mmvit_plugins.checkpoint import safe_mmengine_loading
    with safe_mmengine_loading():
        return dict(Runner.from_cfg(copy.deepcopy(cfg)).test())


def _predictions_as_ground_truth(cfg: Config, ann_file) -> None:
    """Replace the annotations of ``ann_file`` by detections 1, 3, 5, 7 and 9 (in decreasing
    score) of the PyTorch model on each of its images: boxes, labels and masks (RLE)."""
    import json

    import pycocotools.mask as mask_utils
    from mmengine.runner import Runner

    from mmvit_plugins.checkpoint import safe_mmengine_loading
    coco = json.loads(ann_file.read_text())
    ids = {image['file_name']: image['id'] for image in coco['images']}
    categories = [c['id'] for c in coco['categories']]
    with safe_mmengine_loading():
        runner = Runner.from_cfg(copy.deepcopy(cfg))
        runner.load_or_resume()
    runner.model.eval()
    annotations = []
    with torch.no_grad():
        for batch in runner.test_dataloader:
            for sample in runner.model.test_step(batch):
                pred = sample.pred_instances
                for i in torch.argsort(pred.scores, descending=True)[:10:2].tolist():
                    x1, y1, x2, y2 = pred.bboxes[i].tolist()
                    mask = np.asfortranarray(pred.masks[i].numpy().astype(np.uint8))
                    rle = mask_utils.encode(mask)
                    rle['counts'] = rle['counts'].decode()
                    assert mask.any() and x2 > x1 and y2 > y1
                    annotations.append(dict(
                        id=len(annotations) + 1, iscrowd=0, segmentation=rle,
                        image_id=ids[osp.basename(sample.img_path)],
                        category_id=categories[int(pred.labels[i])],
                        bbox=[x1, y1, x2 - x1, y2 - y1], area=float(mask.sum())))
    assert len(annotations) == 5 * len(coco['images'])
    ann_file.write_text(json.dumps(dict(coco, annotations=annotations)))


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def seg_files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('seg')
    backbone = dict(type='RefinerViT', **TINY_BACKBONES['RefinerViT'])
    return _write(tmp_path, _seg_config(backbone, (64, 64)), (64, 64))


def _deploy_error(argv, work_dir) -> str:
    with pytest.raises(SystemExit) as info:
        deploy_tool.main([str(a) for a in argv] + ['--work-dir', str(work_dir)])
    assert not (work_dir / 'end2end.onnx').exists()
    return str(info.value)


def test_deploy_config_of_another_codebase(tmp_path, seg_files):
    config, checkpoint, image = seg_files
    message = _deploy_error([DET_DYNAMIC, config, checkpoint, image], tmp_path)
    assert 'DEPLOY_CFG' in message and "codebase 'mmdet'" in message and 'mmseg' in message


def test_missing_checkpoint_image_and_configs(tmp_path, seg_files):
    config, checkpoint, image = seg_files
    message = _deploy_error([SEG_DYNAMIC, config, tmp_path / 'none.pth', image], tmp_path)
    assert 'CHECKPOINT=' in message and 'not found' in message
    message = _deploy_error([SEG_DYNAMIC, config, checkpoint, tmp_path / 'none.jpg'], tmp_path)
    assert 'IMG=' in message and 'not found' in message
    (tmp_path / 'text.jpg').write_text('not an image')
    message = _deploy_error([SEG_DYNAMIC, config, checkpoint, tmp_path / 'text.jpg'], tmp_path)
    assert 'IMG=' in message and 'not an image' in message
    message = _deploy_error([tmp_path / 'none.py', config, checkpoint, image], tmp_path)
    assert 'DEPLOY_CFG=' in message
    message = _deploy_error([SEG_DYNAMIC, tmp_path / 'none.py', checkpoint, image], tmp_path)
    assert 'MODEL_CFG=' in message


def test_backend_that_is_not_installed(tmp_path, seg_files):
    config, checkpoint, image = seg_files
    deploy_cfg = tmp_path / 'segmentation_tensorrt_static-512x512.py'
    deploy_cfg.write_text(f"_base_ = [{str(SEG_STATIC)!r}]\n"
                          "backend_config = dict(type='tensorrt')\n")
    message = _deploy_error([deploy_cfg, config, checkpoint, image], tmp_path)
    assert "'tensorrt'" in message and 'not installed' in message and 'onnxruntime' in message
    deploy_cfg.write_text(f"_base_ = [{str(SEG_STATIC)!r}]\nbackend_config = dict(type='nope')\n")
    message = _deploy_error([deploy_cfg, config, checkpoint, image], tmp_path)
    assert "'nope'" in message and 'not an mmdeploy backend' in message


def test_failed_export_leaves_no_onnx_file(tmp_path, seg_files, monkeypatch):
    config, checkpoint, image = seg_files

    def broken_export(model, args, f, **kwargs):
        with open(f, 'wb') as file:
            file.write(b'half an ONNX file')
        raise RuntimeError('export failed half-way')

    (tmp_path / 'work').mkdir()
    monkeypatch.setattr(torch.onnx, 'export', broken_export)
    with pytest.raises(RuntimeError, match='half-way'):
        deploy_tool.main([str(SEG_DYNAMIC), config, checkpoint, image, '--work-dir',
                          str(tmp_path / 'work')])
    assert list((tmp_path / 'work').iterdir()) == []


def test_ir_other_than_onnx(tmp_path, seg_files):
    """Both tools refuse a deploy config whose intermediate representation is not ONNX."""
    config, checkpoint, image = seg_files
    deploy_cfg = tmp_path / 'segmentation_torchscript.py'
    deploy_cfg.write_text(f"_base_ = [{str(SEG_DYNAMIC)!r}]\n"
                          "ir_config = dict(type='torchscript', save_file='end2end.pt', "
                          "input_names=['input'], output_names=['output'], input_shape=None)\n")
    message = _deploy_error([deploy_cfg, config, checkpoint, image], tmp_path)
    assert 'DEPLOY_CFG=' in message and "type='torchscript'" in message, message
    assert "allowed values: ['onnx']" in message, message
    with pytest.raises(SystemExit, match=r"DEPLOY_CFG=.*type='torchscript'.*\['onnx'\]"):
        test_tool.main([str(deploy_cfg), config, '--model', checkpoint])


def test_test_tool_errors(tmp_path, seg_files):
    config, _, _ = seg_files
    with pytest.raises(SystemExit, match=r'--model=.*not found'):
        test_tool.main([str(SEG_DYNAMIC), config, '--model', str(tmp_path / 'end2end.onnx')])
    with pytest.raises(SystemExit, match="DEPLOY_CFG=.*codebase 'mmdet'"):
        test_tool.main([str(DET_DYNAMIC), config, '--model', str(tmp_path / 'end2end.onnx')])


# -- make demo ------------------------------------------------------------------------------------
def test_demo_script_end_to_end(tmp_path):
    """``make demo``'s script in a fast form: the toy set, evaluation before and after 2
    training iterations, overlays, image_demo.py, visualize_attention.py, export with deploy.py
    and test.py on the exported model, whose mIoU the script requires to be PyTorch's within
    0.5 points. MAFormer-S (the smallest widths) instead of BOAT-CSWin-T; ``--min-gain -100``:
    2 iterations need not improve the model."""
    work_dir = tmp_path / 'work'
    cmd = [sys.executable, 'tools/misc/demo.py', '--task', 'seg', '--config',
           'configs/upernet_maformer_s_ade20k.py', '--iters', '2', '--min-gain', '-100',
           '--data-root', str(tmp_path / 'toy_ade'), '--work-dir', str(work_dir)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert '[demo] OK: mIoU gained' in result.stdout, result.stdout[-4000:]
    deployed, pytorch = map(float, re.search(r'onnxruntime mIoU ([\d.]+) \(PyTorch ([\d.]+)\)',
                                             result.stdout).groups())
    assert abs(deployed - pytorch) <= 0.5
    assert len(list((work_dir / 'overlays').glob('*.png'))) == 12
    assert len(list((work_dir / 'image_demo').glob('*.png'))) == 1
    # visualize_attention.py --blocks 0: the pyramid and the first MAF block's picture
    pictures = sorted(p.name for p in (work_dir / 'attention').glob('*.png'))
    assert pictures == ['pyramid.png', 'stages_0_blocks_0_window.png']
    assert f"{len(pictures)} attention PNGs of that image" in result.stdout
    assert (work_dir / 'deploy' / 'end2end.onnx').is_file()
    assert (work_dir / 'toy_config.py').is_file()
