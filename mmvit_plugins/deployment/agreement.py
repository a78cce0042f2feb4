"""How an exported model agrees with its PyTorch model, on the same preprocessed input.

Segmentation is compared where the exported graph ends: label maps (and logits, when the graph
exposes them) at the model's input size, before any resize to the original image, so that a
difference is the export's and not a post-processing choice. Detection is compared on the final
predictions of both models' ``test_step`` (boxes in original-image pixels, scores, labels and
pasted masks).

Both sides are compared on the CPU, whatever device each comes from: mmdeploy's onnxruntime
wrapper returns CPU tensors while the PyTorch model may run on a GPU, and the one-to-one matching
reads its values one by one.
"""
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor


def segmentation_agreement(labels: Tensor, reference_logits: Tensor,
                           logits: Optional[Tensor] = None) -> Dict[str, float]:
    """Equal pixels and the largest logit difference.

    Args:
        labels: ``(N, 1, H, W)`` or ``(N, H, W)`` label map of the exported model.
        reference_logits: ``(N, C, H, W)`` logits of the PyTorch model.
        logits: ``(N, C, H, W)`` logits of the exported model, when it exposes them.

    Returns:
        ``equal_pixels`` (share in [0, 1]), ``pixels`` and ``max_logit_diff`` (NaN without
        ``logits``).
    """
    reference = _cpu(reference_logits).float()
    labels = _cpu(labels).long()
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (reference.shape[0], *reference.shape[2:]):
        raise ValueError(f'label map {tuple(labels.shape)} and reference logits '
                         f'{tuple(reference.shape)} differ in size')
    equal = (labels == reference.argmax(dim=1)).float().mean().item()
    diff = float('nan')
    if logits is not None:
        if logits.shape != reference.shape:
            raise ValueError(f'logits {tuple(logits.shape)} and reference logits '
                             f'{tuple(reference.shape)} differ in shape')
        diff = (_cpu(logits).float() - reference).abs().max().item()
    return dict(equal_pixels=equal, pixels=float(labels.numel()), max_logit_diff=diff)


def detection_agreement(instances, reference, iou_thr: float = 0.99) -> Dict[str, float]:
    """Match detections of an exported model to the PyTorch model's, one to one.

    In order of decreasing reference score, a reference detection takes the unmatched
    detection of the same label with the highest box IoU, if that IoU exceeds ``iou_thr``.

    Args:
        instances: ``pred_instances`` of the exported model (``bboxes``, ``scores``,
            ``labels``, optionally ``masks``).
        reference: ``pred_instances`` of the PyTorch model.

    Returns:
        ``matched``, ``detections`` (exported), ``reference`` (PyTorch), ``min_iou``,
        ``max_box_diff`` (pixels), ``max_score_diff`` and ``min_mask_iou`` over matched pairs
        (NaN when nothing matched, mask IoU NaN without masks).
    """
    from mmdet.structures.bbox import bbox_overlaps
    boxes, ref_boxes = _cpu(instances.bboxes).float(), _cpu(reference.bboxes).float()
    labels, ref_labels = _cpu(instances.labels), _cpu(reference.labels)
    scores, ref_scores = _cpu(instances.scores).float(), _cpu(reference.scores).float()
    ious = bbox_overlaps(ref_boxes, boxes) if len(boxes) and len(ref_boxes) else \
        torch.zeros(len(ref_boxes), len(boxes))
    same_label = ref_labels[:, None] == labels[None, :]
    ious = torch.where(same_label, ious, torch.zeros_like(ious))
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    pairs: List[Tuple[int, int]] = []
    for i in torch.argsort(ref_scores, descending=True).tolist() if len(boxes) else []:
        row = ious[i].masked_fill(taken, -1.)
        j = int(row.argmax())
        if row[j] > iou_thr:
            taken[j] = True
            pairs.append((i, j))
    result = dict(matched=float(len(pairs)), detections=float(len(boxes)),
                  reference=float(len(ref_boxes)), min_iou=float('nan'),
                  max_box_diff=float('nan'), max_score_diff=float('nan'),
                  min_mask_iou=float('nan'))
    if not pairs:
        return result
    ref_idx = torch.tensor([i for i, _ in pairs])
    idx = torch.tensor([j for _, j in pairs])
    result['min_iou'] = ious[ref_idx, idx].min().item()
    result['max_box_diff'] = (boxes[idx] - ref_boxes[ref_idx]).abs().max().item()
    result['max_score_diff'] = (scores[idx] - ref_scores[ref_idx]).abs().max().item()
    if 'masks' in instances and 'masks' in reference:
        masks = _cpu(instances.masks)[idx].bool().flatten(1)
        ref_masks = _cpu(reference.masks)[ref_idx].bool().flatten(1)
        union = (masks | ref_masks).sum(1)
        iou = (masks & ref_masks).sum(1) / union.clamp(min=1)
        result['min_mask_iou'] = torch.where(union == 0, torch.ones_like(iou), iou).min().item()
    return result


def _cpu(value: Union[Tensor, np.ndarray]) -> Tensor:
    """``value`` (a tensor on any device, or an array) as a CPU tensor."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    return torch.as_tensor(value, device='cpu')


def format_segmentation(agreement: Dict[str, float]) -> str:
    text = (f"equal pixels {100 * agreement['equal_pixels']:.3f} % of "
            f"{int(agreement['pixels'])}")
    if not np.isnan(agreement['max_logit_diff']):
        text += f", max |logit difference| {agreement['max_logit_diff']:.3g}"
    return text


def format_detection(agreement: Dict[str, float]) -> str:
    text = (f"matched detections {int(agreement['matched'])}/{int(agreement['reference'])} "
            f"(exported model: {int(agreement['detections'])})")
    if agreement['matched']:
        text += (f", min box IoU {agreement['min_iou']:.5f}, max |box difference| "
                 f"{agreement['max_box_diff']:.3g} px, max |score difference| "
                 f"{agreement['max_score_diff']:.3g}")
        if not np.isnan(agreement['min_mask_iou']):
            text += f", min mask IoU {agreement['min_mask_iou']:.4f}"
    return text
