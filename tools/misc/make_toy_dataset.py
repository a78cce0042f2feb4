"""Make a small, seeded toy dataset in ADE20K layout (segmentation) or COCO layout (detection),
and adapt a full-size config to it.

    python tools/misc/make_toy_dataset.py seg data/toy_ade   [--num-train 48] [--size 128]
    python tools/misc/make_toy_dataset.py det data/toy_coco  [--num-train 48] [--size 160]

Every image shows a striped background and a few shapes, one texture and colour family per
class, so that a model learns the task in a few hundred CPU iterations. Making a dataset that
already exists with the same arguments does nothing.

Segmentation: ``images/{training,validation}/*.jpg`` + ``annotations/{...}/*.png`` label maps
whose values 1..5 are ADE20K's first five classes after ``reduce_zero_label`` (0 = "other",
ignored): wall (striped background), building (brick squares), sky (blue circles),
floor (checkered triangles), tree (speckled green ellipses).
Detection: ``{train,val}/*.jpg`` + ``annotations/instances_{train,val}.json`` with polygon
masks of three classes, ``TOY_DET_CLASSES``.
"""
import argparse
import json
import math
import os.path as osp
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

TOY_SEG_CLASSES = ('wall', 'building', 'sky', 'floor', 'tree')  # ADE20K ids 0..4
TOY_DET_CLASSES = ('square', 'circle', 'triangle')
_STAMP = 'toy_dataset.json'

Shape = Tuple[str, np.ndarray]  # (kind, polygon as int32 (K, 2) array of x, y)


# -- textures -----------------------------------------------------------------------------------
def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(150, 200, size=3)
    period = rng.integers(6, 10)
    rows = (np.arange(size) // (period // 2)) % 2
    img = np.broadcast_to(base, (size, size, 3)) - 40 * rows[:, None, None]
    return img + rng.normal(0, 6, (size, size, 3))


def _bricks(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.empty((size, size, 3))
    img[:] = (40, 50, rng.uniform(150, 220))  # BGR: red
    yy, xx = np.mgrid[:size, :size]
    mortar = (yy % 8 == 0) | ((xx + 8 * ((yy // 8) % 2)) % 16 == 0)
    img[mortar] = 220
    return img + rng.normal(0, 8, (size, size, 3))


def _sky(rng: np.random.Generator, size: int) -> np.ndarray:
    yy = np.linspace(0, 1, size)[:, None, None]
    top = np.array([rng.uniform(200, 255), rng.uniform(120, 160), 40.])
    return np.broadcast_to(top - 60 * yy * np.array([1., 1., 0.]), (size, size, 3)).copy()


def _checkers(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cells = ((yy // 6 + xx // 6) % 2)[..., None]
    light = np.array([60., rng.uniform(190, 230), 240.])
    return light - cells * np.array([40., 110., 120.]) + rng.normal(0, 5, (size, size, 3))


def _speckles(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.empty((size, size, 3))
    img[:] = (40, rng.uniform(120, 180), 40)
    dots = rng.random((size, size)) < 0.15
    img[dots] = (20, 230, 90)
    return img


TEXTURES: Dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    'square': _bricks, 'circle': _sky, 'triangle': _checkers, 'ellipse': _speckles,
}


# -- shapes -------------------------------------------------------------------------------------
def _polygon(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    if kind == 'square':
        angles = np.deg2rad(45 + rng.uniform(-20, 20) + np.arange(4) * 90)
        radii = np.full(4, r)
    elif kind == 'triangle':
        angles = np.deg2rad(rng.uniform(0, 120) + np.arange(3) * 120)
        radii = np.full(3, r)
    elif kind == 'circle':
        angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        radii = np.full(24, r)
    elif kind == 'ellipse':
        angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        ratio = rng.uniform(0.5, 0.8)
        tilt = rng.uniform(0, math.pi)
        radii = r * ratio / np.sqrt((ratio * np.cos(angles - tilt))**2 + np.sin(angles - tilt)**2)
    else:
        raise ValueError(f'kind={kind!r} is not a toy shape; allowed values: {sorted(TEXTURES)}')
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32)


def _scene(rng: np.random.Generator, size: int, kinds: Sequence[str],
           max_shapes: int = 4) -> Tuple[np.ndarray, List[Shape]]:
    """A striped background with 1..max_shapes non-overlapping textured shapes."""
    img = _stripes(rng, size)
    shapes: List[Shape] = []
    circles: List[Tuple[float, float, float]] = []
    for _ in range(50 * max_shapes):
        if len(shapes) == max_shapes or (len(shapes) and rng.random() < 0.02):
            break
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        if any(math.hypot(cx - x, cy - y) < r + q + 2 for x, y, q in circles):
            continue
        kind = kinds[rng.integers(len(kinds))]
        poly = _polygon(kind, cx, cy, r, rng)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [poly], 1)
        img[mask.astype(bool)] = TEXTURES[kind](rng, size)[mask.astype(bool)]
        shapes.append((kind, poly))
        circles.append((cx, cy, r))
    return np.clip(img, 0, 255).astype(np.uint8), shapes


# -- writers ------------------------------------------------------------------------------------
def _up_to_date(root: Path, params: dict) -> bool:
    stamp = root / _STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == params


def make_seg_toy(root: str, num_train: int = 48, num_val: int = 12, size: int = 128,
                 seed: int = 0) -> Path:
    """Write the ADE20K-layout toy set under ``root`` (idempotent); return its path."""
    _check_counts(num_train, num_val, size)
    out = Path(root)
    params = dict(task='seg', num_train=num_train, num_val=num_val, size=size, seed=seed)
    if _up_to_date(out, params):
        return out
    rng = np.random.default_rng(seed)
    kinds = ('square', 'circle', 'triangle', 'ellipse')
    label_of = {kind: i + 2 for i, kind in enumerate(kinds)}  # 1 = wall (background)
    for split, count in (('training', num_train), ('validation', num_val)):
        (out / 'images' / split).mkdir(parents=True, exist_ok=True)
        (out / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, shapes = _scene(rng, size, kinds)
            label = np.ones((size, size), np.uint8)
            for kind, poly in shapes:
                cv2.fillPoly(label, [poly], label_of[kind])
            name = f'toy_{split}_{i:04d}'
            cv2.imwrite(str(out / 'images' / split / f'{name}.jpg'), img,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(out / 'annotations' / split / f'{name}.png'), label)
    (out / _STAMP).write_text(json.dumps(params))
    return out


def make_det_toy(root: str, num_train: int = 48, num_val: int = 12, size: int = 160,
                 seed: int = 0) -> Path:
    """Write the COCO-layout toy set (boxes + polygon masks) under ``root`` (idempotent)."""
    _check_counts(num_train, num_val, size)
    out = Path(root)
    params = dict(task='det', num_train=num_train, num_val=num_val, size=size, seed=seed)
    if _up_to_date(out, params):
        return out
    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(TOY_DET_CLASSES)]
    cat_id = {name: i + 1 for i, name in enumerate(TOY_DET_CLASSES)}
    (out / 'annotations').mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in (('train', num_train), ('val', num_val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, shapes = _scene(rng, size, TOY_DET_CLASSES)
            file_name = f'toy_{split}_{i:04d}.jpg'
            cv2.imwrite(str(out / split / file_name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=i + 1, file_name=file_name, width=size, height=size))
            for kind, poly in shapes:
                x0, y0 = poly.min(0).clip(0, size - 1)
                x1, y1 = poly.max(0).clip(0, size - 1)
                mask = np.zeros((size, size), np.uint8)
                cv2.fillPoly(mask, [poly], 1)
                annotations.append(dict(
                    id=ann_id, image_id=i + 1, category_id=cat_id[kind], iscrowd=0,
                    bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                    area=float(mask.sum()),
                    segmentation=[poly.clip(0, size - 1).astype(float).ravel().tolist()]))
                ann_id += 1
        coco = dict(images=images, annotations=annotations, categories=categories)
        (out / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))
    (out / _STAMP).write_text(json.dumps(params))
    return out


def _check_counts(num_train: int, num_val: int, size: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train={num_train} and num_val={num_val} must both be >= 1')
    if size < 32:
        raise ValueError(f'size={size} is too small; allowed values: >= 32')


# -- config adaptation --------------------------------------------------------------------------
def _scale_pipeline(pipeline: list, factor: float) -> None:
    """Multiply every resize scale and crop size of a pipeline (nested ones too) by factor."""
    def scaled(value):
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
            return [scaled(v) for v in value]
        return tuple(max(1, round(v * factor)) for v in value)

    for transform in pipeline:
        if isinstance(transform, (list, tuple)):
            _scale_pipeline(transform, factor)
            continue
        for key in ('scale', 'scales', 'crop_size'):
            if isinstance(transform.get(key), (tuple, list)):
                transform[key] = scaled(transform[key])
        if 'transforms' in transform:
            _scale_pipeline(transform['transforms'], factor)


def toy_overrides(cfg, task: str, data_root: str, size: int, crop_size: int = 0) -> List[str]:
    """Point ``cfg`` (a loaded full-size config) at a toy dataset, in place, and return a
    readable list of what changed. Images of the toy set are ``size`` pixels; resize scales and
    crops shrink by the same factor (``crop_size`` overrides the segmentation crop).
    """
    if task not in ('seg', 'det'):
        raise ValueError(f"task={task!r}; allowed values: 'seg', 'det'")
    data_root = osp.abspath(data_root)
    loaders = [cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader]
    changes = [f'data_root={data_root}']
    for loader in loaders:
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = data_root
    if task == 'seg':
        factor = size / cfg.model.data_preprocessor.size[0]
        crop = crop_size or max(1, round(cfg.model.data_preprocessor.size[0] * factor))
        for loader in loaders:
            _scale_pipeline(loader.dataset.pipeline, factor)
        if cfg.get('test_pipeline'):  # what inference APIs and mmdeploy use
            _scale_pipeline(cfg.test_pipeline, factor)
        for transform in cfg.train_dataloader.dataset.pipeline:
            if transform['type'] == 'RandomCrop':
                transform['crop_size'] = (crop, crop)
        cfg.model.data_preprocessor.size = (crop, crop)
        changes.append(f'crop_size=({crop}, {crop}); resize scales x{factor:g} '
                       f'(toy images are {size}x{size})')
    else:
        factor = size / 800
        splits = {'train': cfg.train_dataloader, 'val': cfg.val_dataloader,
                  'test': cfg.test_dataloader}
        for split, loader in splits.items():
            ann_split = 'train' if split == 'train' else 'val'
            loader.dataset.ann_file = f'annotations/instances_{ann_split}.json'
            loader.dataset.data_prefix = dict(img=f'{ann_split}/')
            loader.dataset.metainfo = dict(classes=TOY_DET_CLASSES)
            _scale_pipeline(loader.dataset.pipeline, factor)
        if cfg.get('test_pipeline'):
            _scale_pipeline(cfg.test_pipeline, factor)
        if cfg.get('tta_pipeline'):
            _scale_pipeline(cfg.tta_pipeline, factor)
        for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
            evaluator.ann_file = osp.join(data_root, 'annotations', 'instances_val.json')
        roi_head = cfg.model.roi_head
        roi_head.bbox_head.num_classes = len(TOY_DET_CLASSES)
        roi_head.mask_head.num_classes = len(TOY_DET_CLASSES)
        changes.append(f'classes={TOY_DET_CLASSES} (num_classes={len(TOY_DET_CLASSES)}); '
                       f'resize scales x{factor:g}, test-time augmentation included '
                       f'(toy images are {size}x{size})')
    changes.append('dataloader num_workers=0')
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('task', choices=['seg', 'det'])
    parser.add_argument('root', help='output folder (kept out of git: use data/...)')
    parser.add_argument('--num-train', type=int, default=48)
    parser.add_argument('--num-val', type=int, default=12)
    parser.add_argument('--size', type=int, default=None,
                        help='image side in pixels (default: 128 seg, 160 det)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make = make_seg_toy if args.task == 'seg' else make_det_toy
    size = args.size or (128 if args.task == 'seg' else 160)
    out = make(args.root, args.num_train, args.num_val, size, args.seed)
    print(f'toy {args.task} dataset ready: {out}')


if __name__ == '__main__':
    main()
