"""mmvit_plugins.deployment.agreement on inputs that disagree: every count and difference it
reports equals one computed here independently (float64, by hand), and the comparison works
when the PyTorch reference lives on another device than the exported model's CPU outputs."""
import math
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from mmengine.structures import InstanceData
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map_only

from mmvit_plugins.deployment.agreement import detection_agreement, segmentation_agreement

H, W = 40, 60
REF_BOXES = [[2., 2., 12., 12.], [20., 5., 35., 25.], [40., 10., 58., 30.], [5., 20., 25., 38.],
             [30., 28., 50., 39.]]
REF_LABELS = [0, 1, 2, 0, 1]
REF_SCORES = [0.9, 0.8, 0.7, 0.6, 0.5]
# The exported model lists the same detections in another order.
ORDER = [3, 0, 4, 1, 2]


class OtherDevice(Tensor):
    """Real CPU data that reports another device and, as a CUDA tensor does, refuses every
    operation that mixes it with a CPU tensor of one element or more; ``.cpu()`` gives the data
    back as a CPU tensor. It lets a CPU-only machine run a comparison whose two sides live on two
    devices."""

    @staticmethod
    def __new__(cls, data: Tensor, device: str = 'cuda') -> 'OtherDevice':
        return Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                             dtype=data.dtype, device=torch.device(device))

    def __init__(self, data: Tensor, device: str = 'cuda') -> None:
        self.inner = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        device = next(t.device for t in leaves if isinstance(t, cls))
        mixed = [t for t in leaves if not isinstance(t, cls) and t.dim() > 0]
        if mixed:
            raise RuntimeError('Expected all tensors to be on the same device, but found at '
                               f'least two devices, {device} and {mixed[0].device}!')
        args, kwargs = tree_map_only(cls, lambda t: t.inner, (args, kwargs))
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get('device') is not None \
                and torch.device(kwargs['device']).type == 'cpu':
            return out
        return tree_map_only(Tensor, lambda t: cls(t, str(device)), out)


def on_other_device(tensor: Tensor) -> OtherDevice:
    return OtherDevice(tensor.clone())


def test_other_device_refuses_mixing_as_cuda_does():
    x = on_other_device(torch.arange(4.))
    assert x.device.type == 'cuda' and not isinstance(x.cpu(), OtherDevice)
    assert torch.equal(x.cpu(), torch.arange(4.))
    with pytest.raises(RuntimeError, match='same device'):
        x + torch.ones(4)
    assert torch.equal((x * torch.tensor(2.)).cpu(), torch.arange(4.) * 2)  # 0-dim: allowed


# -- segmentation ---------------------------------------------------------------------------------
def _logits(seed: int = 0) -> Tensor:
    return torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(seed))


def _flip(labels: Tensor, count: int, num_classes: int = 5) -> Tensor:
    """``labels`` with ``count`` pixels (spread over both images) set to another class."""
    flat = labels.clone().flatten()
    positions = torch.arange(count) * (flat.numel() // max(count, 1))
    flat[positions] = (flat[positions] + 1) % num_classes
    return flat.view_as(labels)


@pytest.mark.parametrize('keepdim', [False, True], ids=['NHW', 'N1HW'])
@pytest.mark.parametrize('count', [0, 1, 10])
def test_segmentation_counts_equal_pixels(count, keepdim):
    reference = _logits()
    labels = _flip(reference.argmax(1), count)
    result = segmentation_agreement(labels.unsqueeze(1) if keepdim else labels, reference)
    assert result['pixels'] == 2 * 7 * 9
    assert result['equal_pixels'] == pytest.approx(1 - count / (2 * 7 * 9), rel=1e-6, abs=0)
    assert math.isnan(result['max_logit_diff'])


def test_segmentation_largest_logit_difference():
    reference = _logits()
    logits = reference.clone()
    logits[1, 3, 4, 5] += 0.25
    logits[0, 0, 0, 0] -= 0.125
    result = segmentation_agreement(logits.argmax(1), reference, logits)
    expected = (logits.double() - reference.double()).abs().max().item()
    assert result['max_logit_diff'] == pytest.approx(expected, rel=1e-6, abs=0)
    assert result['max_logit_diff'] == pytest.approx(0.25, rel=1e-6, abs=0)
    assert segmentation_agreement(reference.argmax(1), reference, reference)['max_logit_diff'] == 0


def test_segmentation_refuses_other_sizes():
    reference = _logits()
    with pytest.raises(ValueError, match='differ in size'):
        segmentation_agreement(torch.zeros(2, 7, 10, dtype=torch.long), reference)
    with pytest.raises(ValueError, match='differ in size'):
        segmentation_agreement(torch.zeros(2, 1, 7, 10, dtype=torch.long), reference)
    with pytest.raises(ValueError, match='differ in size'):
        segmentation_agreement(reference.argmax(1)[:1], reference)
    with pytest.raises(ValueError, match='differ in shape'):
        segmentation_agreement(reference.argmax(1), reference, reference[:, :4])


# -- detection ------------------------------------------------------------------------------------
def _box_masks(boxes) -> Tensor:
    """Each box's pixels as an ``(N, H, W)`` boolean mask."""
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[int(y1):int(y2), int(x1):int(x2)] = True
    return masks


def _instances(boxes, labels, scores, masks: Optional[Tensor] = None) -> InstanceData:
    data = dict(bboxes=torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                labels=torch.tensor(labels, dtype=torch.long),
                scores=torch.tensor(scores, dtype=torch.float32))
    if masks is not None:
        data['masks'] = masks
    return InstanceData(**data)


def _reference(masks: bool = False) -> InstanceData:
    return _instances(REF_BOXES, REF_LABELS, REF_SCORES,
                      _box_masks(REF_BOXES) if masks else None)


def _exported(box_delta: float = 0.01, score_delta: float = 1e-3, masks: bool = False,
              drop=(), boxes=None, labels=None) -> InstanceData:
    """The reference's detections in ``ORDER``, each box's x1 moved by ``box_delta`` times its
    position in ``ORDER`` and each score by ``score_delta``; ``boxes`` and ``labels`` replace
    entries (by reference index), ``drop`` leaves reference indices out."""
    boxes_, labels_ = dict(enumerate(REF_BOXES)), dict(enumerate(REF_LABELS))
    boxes_.update(boxes or {})
    labels_.update(labels or {})
    keep = [i for i in ORDER if i not in drop]
    out_boxes = [[boxes_[i][0] + box_delta * n] + boxes_[i][1:] for n, i in enumerate(keep)]
    return _instances(out_boxes, [labels_[i] for i in keep],
                      [REF_SCORES[i] + score_delta for i in keep],
                      _box_masks([REF_BOXES[i] for i in keep]) if masks else None)


def _iou(a, b) -> float:
    """Box IoU in float64, by hand."""
    w = max(0., min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0., min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _expected(instances: InstanceData, pairs: Dict[int, int]) -> Dict[str, float]:
    """What the matching ``pairs`` (reference index -> exported index) give, in float64."""
    boxes, ref = instances.bboxes.double().tolist(), REF_BOXES
    scores = instances.scores.double()
    return dict(
        matched=float(len(pairs)), detections=float(len(boxes)), reference=float(len(ref)),
        min_iou=min(_iou(ref[i], boxes[j]) for i, j in pairs.items()),
        max_box_diff=max(abs(boxes[j][k] - ref[i][k]) for i, j in pairs.items() for k in range(4)),
        max_score_diff=max(abs(scores[j].item() - REF_SCORES[i]) for i, j in pairs.items()))


def _assert_agreement(result: Dict[str, float], expected: Dict[str, float]) -> None:
    for key in ('matched', 'detections', 'reference'):
        assert result[key] == expected[key], (key, result, expected)
    for key in ('min_iou', 'max_box_diff', 'max_score_diff'):
        # the function computes in float32
        assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (key, result)


def test_detection_matches_the_same_detections_in_another_order():
    exported = _exported()
    result = detection_agreement(exported, _reference())
    pairs = {i: n for n, i in enumerate(ORDER)}
    _assert_agreement(result, _expected(exported, pairs))
    assert result['max_box_diff'] == pytest.approx(0.04, rel=1e-4)  # the last of ORDER's x1
    assert result['max_score_diff'] == pytest.approx(1e-3, rel=1e-4)
    assert math.isnan(result['min_mask_iou'])


def test_detection_does_not_match_a_shifted_box():
    """A box 1 px to the right (IoU 0.875) is no match at IoU > 0.99; at IoU > 0.8 it is."""
    shifted = [21., 5., 36., 25.]
    assert _iou(REF_BOXES[1], shifted) == pytest.approx(0.875)
    exported = _exported(boxes={1: shifted})
    pairs = {i: n for n, i in enumerate(ORDER) if i != 1}
    _assert_agreement(detection_agreement(exported, _reference()), _expected(exported, pairs))
    loose = detection_agreement(exported, _reference(), iou_thr=0.8)
    _assert_agreement(loose, _expected(exported, {i: n for n, i in enumerate(ORDER)}))
    assert loose['min_iou'] == pytest.approx(_iou(REF_BOXES[1], [21.03, 5., 36., 25.]), rel=1e-5)


def test_detection_does_not_match_swapped_labels():
    exported = _exported(labels={0: 1, 1: 0})
    pairs = {i: n for n, i in enumerate(ORDER) if i not in (0, 1)}
    _assert_agreement(detection_agreement(exported, _reference()), _expected(exported, pairs))


def test_detection_counts_missing_and_extra_detections():
    exported = _exported(drop=(2, 4))
    keep = [i for i in ORDER if i not in (2, 4)]
    result = detection_agreement(exported, _reference())
    _assert_agreement(result, _expected(exported, {i: n for n, i in enumerate(keep)}))
    assert (result['matched'], result['detections'], result['reference']) == (3, 3, 5)
    # The reference misses what the exported model detects.
    result = detection_agreement(_reference(), exported)
    assert (result['matched'], result['detections'], result['reference']) == (3, 5, 3)


def test_detection_matches_one_to_one_by_decreasing_reference_score():
    """Two reference detections on (nearly) one box, one exported detection: the higher-scoring
    reference detection takes it, the other stays unmatched."""
    reference = _instances([[10., 10., 30., 30.], [10., 10., 30., 30.05]], [0, 0], [0.3, 0.9])
    exported = _instances([[10., 10., 30., 30.]], [0], [0.9])
    result = detection_agreement(exported, reference)
    assert (result['matched'], result['detections'], result['reference']) == (1, 1, 2)
    assert result['max_score_diff'] == 0  # matched the 0.9 reference, not the 0.3 one
    assert result['max_box_diff'] == pytest.approx(0.05, rel=1e-4)
    # two exported detections on that box: both match
    exported = _instances([[10., 10., 30., 30.]] * 2, [0, 0], [0.9, 0.3])
    assert detection_agreement(exported, reference)['matched'] == 2


def test_detection_with_nothing_to_match():
    for exported, reference in ((_instances([], [], []), _reference()),
                                (_exported(), _instances([], [], [])),
                                (_exported(labels={i: 3 for i in range(5)}), _reference())):
        result = detection_agreement(exported, reference)
        assert result['matched'] == 0
        assert result['detections'] == len(exported) and result['reference'] == len(reference)
        assert all(math.isnan(result[k]) for k in ('min_iou', 'max_box_diff', 'max_score_diff',
                                                    'min_mask_iou'))


def test_detection_mask_iou():
    """Masks of matched pairs: the lowest IoU, by hand; two empty masks agree."""
    reference, exported = _reference(masks=True), _exported(masks=True)
    assert detection_agreement(exported, reference)['min_mask_iou'] == 1
    masks = exported.masks.clone()
    n = ORDER.index(3)  # reference box 3 (20x18 pixels), its exported mask grows by 2 columns
    masks[n, 20:38, 25:27] = True
    masks[ORDER.index(0), 2:4, 2:12] = False  # reference box 0 (10x10) loses 2 rows
    exported.masks = masks
    expected = min(360 / 396, 80 / 100)
    result = detection_agreement(exported, reference)
    assert result['min_mask_iou'] == pytest.approx(expected, rel=1e-6)
    ref_masks = reference.masks.numpy()
    by_hand = [np.logical_and(masks[n].numpy(), ref_masks[i]).sum()
               / np.logical_or(masks[n].numpy(), ref_masks[i]).sum() for n, i in enumerate(ORDER)]
    assert result['min_mask_iou'] == pytest.approx(min(by_hand), rel=1e-6)
    empty = reference.masks.clone()
    empty[:] = False
    reference.masks, exported.masks = empty, empty[ORDER]
    assert detection_agreement(exported, reference)['min_mask_iou'] == 1


# -- devices -------------------------------------------------------------------------------------
def test_segmentation_with_the_reference_on_another_device():
    """mmdeploy's onnxruntime wrapper returns CPU tensors; the PyTorch model may run on CUDA."""
    reference = _logits()
    labels = _flip(reference.argmax(1), 10)
    logits = reference + 0.5 * (labels != reference.argmax(1)).unsqueeze(1)
    expected = segmentation_agreement(labels, reference, logits)
    assert segmentation_agreement(labels, on_other_device(reference), logits) == expected
    assert segmentation_agreement(on_other_device(labels), reference,
                                  on_other_device(logits)) == expected


def test_detection_with_the_reference_on_another_device():
    reference = _reference(masks=True)
    exported = _exported(boxes={1: [21., 5., 36., 25.]}, masks=True)
    expected = detection_agreement(exported, reference)
    assert expected['matched'] == 4
    moved = InstanceData(**{key: on_other_device(value) for key, value in reference.items()})
    assert detection_agreement(exported, moved) == expected
    moved = InstanceData(**{key: on_other_device(value) for key, value in exported.items()})
    assert detection_agreement(moved, reference) == expected
