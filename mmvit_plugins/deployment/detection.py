"""mmdeploy rewrites of Mask R-CNN's post-processing that export what mmdet's ``predict`` runs.

mmdeploy's own rewrites differ from mmdet's predict:

- ``RPNHead.predict_by_feat``: one NMS over the proposals of all FPN levels (mmdet: one per
  level, ``batched_nms`` with the level as the class), empty boxes kept (mmdet drops boxes with
  a side ``<= min_bbox_size``), a score threshold of the deploy config's ``post_processing``
  (mmdet's RPN has none), and zero boxes padding the proposals when fewer than
  ``max_per_img`` survive, which the RoI head then scores like real proposals;
- ``BBoxHead.predict_by_feat``: every (RoI, class) detection gets the box regressed for the RoI's
  best class (ONNX ``NonMaxSuppression`` shares boxes across classes); mmdet keeps each class's
  own box and runs one ``batched_nms`` over all (RoI, class) pairs.

The rewrites here (``StandardRoIHead.predict_bbox`` too, for the padding proposals) follow
mmdet with ONNX's ``NonMaxSuppression`` (mmdeploy's ``ONNXNMSop`` symbolic) on one class: the
boxes of a level / a class are offset by ``index * (max_coordinate + 1)``, mmdet's
``batched_nms`` trick, so that groups never overlap. What mmdet drops (empty proposals, pairs at
or below the score threshold, padding proposals) gets a score below the NMS threshold instead:
the graph keeps static shapes up to the NMS. Registered for the onnxruntime backend; other NMS
types than ``'nms'`` keep mmdeploy's rewrites.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmdeploy.codebase.mmdet.deploy import gather_topk
from mmdeploy.codebase.mmdet.models.dense_heads.rpn_head import rpn_head__predict_by_feat
from mmdeploy.codebase.mmdet.models.roi_heads.bbox_head import bbox_head__predict_by_feat
from mmdeploy.core import FUNCTION_REWRITER
from mmdeploy.mmcv.ops.nms import ONNXNMSop
from mmdeploy.utils import is_dynamic_shape
from mmdet.structures.bbox import get_box_tensor
from mmengine.config import ConfigDict
from torch import Tensor

# Score of what mmdet drops before its NMS (below every NMS threshold used here: real scores are
# probabilities, >= 0) and of the rows that pad the proposals of an image.
DROPPED_SCORE = -1.0
NMS_BACKENDS = ('onnxruntime', )


class NMSop(ONNXNMSop):
    """ONNX ``NonMaxSuppression`` (mmdeploy's symbolic) whose PyTorch forward has ONNX's
    semantics: only scores strictly above ``score_threshold`` are kept, also when it is <= 0
    (mmcv's ``nms`` then keeps every score)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_output_boxes_per_class: int,
                iou_threshold: float, score_threshold: float) -> Tensor:
        """boxes (B, M, 4), scores (B, C, M) -> (K, 3) rows (batch, class, box index)."""
        from mmcv.ops import nms
        indices = []
        for batch_id in range(scores.shape[0]):
            for cls_id in range(scores.shape[1]):
                candidates = torch.nonzero(scores[batch_id, cls_id] > score_threshold)[:, 0]
                _, keep = nms(boxes[batch_id, candidates], scores[batch_id, cls_id, candidates],
                              float(iou_threshold), max_num=max_output_boxes_per_class)
                keep = candidates[keep]
                indices.append(torch.stack(
                    [torch.full_like(keep, batch_id), torch.full_like(keep, cls_id), keep], -1))
        return torch.cat(indices)


def offset_nms(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor,
               max_num: int, iou_threshold: float, score_threshold: float,
               pad_score: float) -> Tuple[Tensor, Tensor]:
    """mmdet's ``batched_nms`` (NMS within each group) followed by the first ``max_num``, as one
    ONNX ``NonMaxSuppression`` per image.

    Args:
        boxes: (B, M, 4) boxes (x1, y1, x2, y2).
        scores: (B, M) scores; pairs with ``valid`` False are never kept.
        groups: (B, M) integer group ids (FPN level or class).
        valid: (B, M) bool, what mmdet passes to its NMS.
        max_num: detections kept per image, in descending score order.
        iou_threshold: NMS IoU threshold (a box is suppressed above it).
        score_threshold: scores at or below it are never kept.
        pad_score: score of the rows padding an image's detections to the batch's count.

    Returns:
        dets (B, K, 5) boxes and scores in descending score order, indices (B, K) into M;
        padding rows have score ``pad_score``, zero boxes and index -1.
    """
    batch_size = boxes.shape[0]
    scores = torch.where(valid, scores, scores.new_full((), DROPPED_SCORE))
    # mmdet: offsets = idxs * (boxes.max() + 1), the maximum over the boxes its NMS sees
    max_coordinate = torch.where(valid.unsqueeze(-1), boxes, boxes.new_zeros(())).flatten(1)
    offsets = groups.to(boxes.dtype) * (max_coordinate.max(1, keepdim=True)[0] + 1)
    selected = NMSop.apply(boxes + offsets.unsqueeze(-1), scores.unsqueeze(1), max_num,
                           iou_threshold, max(score_threshold, DROPPED_SCORE / 2))
    batch_inds, box_inds = selected[:, 0], selected[:, 2]
    # every image's selection in one (B, K + 1) row: other images' entries and one extra column
    # (no empty tensor) have the padding score, and sort last
    own = batch_inds.unsqueeze(0) == torch.arange(
        batch_size, device=boxes.device, dtype=batch_inds.dtype).unsqueeze(1)
    own = torch.cat([own, own.new_zeros((batch_size, 1))], 1)
    sel_scores = torch.cat([scores[batch_inds, box_inds], scores.new_full((1, ), pad_score)])
    sel_boxes = torch.cat([boxes[batch_inds, box_inds], boxes.new_zeros((1, 4))])
    sel_inds = torch.cat([box_inds, box_inds.new_full((1, ), -1)])
    row_scores = torch.where(own, sel_scores.unsqueeze(0), scores.new_full((), pad_score))
    row_scores, order = row_scores.topk(max_num, dim=1)
    own = own.gather(1, order)
    dets = torch.cat([
        torch.where(own.unsqueeze(-1), sel_boxes[order], boxes.new_zeros(())),
        row_scores.unsqueeze(-1)
    ], -1)
    return dets, torch.where(own, sel_inds[order], sel_inds.new_full((), -1))


def rpn_head__predict_by_feat__mmdet(self,
                                     cls_scores: List[Tensor],
                                     bbox_preds: List[Tensor],
                                     score_factors: Optional[List[Tensor]] = None,
                                     batch_img_metas: Optional[List[dict]] = None,
                                     cfg: Optional[ConfigDict] = None,
                                     rescale: bool = False,
                                     with_nms: bool = True,
                                     **kwargs) -> Tuple[Tensor, Tensor]:
    """Rewrite of ``RPNHead.predict_by_feat``: mmdet's proposals.

    Per level the ``nms_pre`` best anchors, boxes with a side ``<= min_bbox_size`` dropped, NMS
    within each level, the ``max_per_img`` best of all levels.

    Returns:
        proposals (B, K, 5) (x1, y1, x2, y2, score) in descending score order, rows padding an
        image's proposals to the batch's K with score ``DROPPED_SCORE``; labels (B, K), zeros.
    """
    ctx = FUNCTION_REWRITER.get_context()
    cfg = self.test_cfg if cfg is None else cfg
    if not with_nms or cfg.nms.get('type', 'nms') != 'nms' or self.bbox_coder.encode_size != 4:
        return rpn_head__predict_by_feat(self, cls_scores, bbox_preds, score_factors,
                                         batch_img_metas, cfg, rescale, with_nms, **kwargs)
    num_levels = len(cls_scores)
    batch_size = cls_scores[0].shape[0]
    mlvl_anchors = self.anchor_generator.grid_anchors(
        [cls_scores[i].shape[-2:] for i in range(num_levels)], device=cls_scores[0].device)
    nms_pre = cfg.get('nms_pre', -1)
    mlvl_scores, mlvl_deltas, mlvl_anchors_kept, mlvl_levels = [], [], [], []
    for level, (cls_score, bbox_pred, anchors) in enumerate(
            zip(cls_scores, bbox_preds, mlvl_anchors)):
        cls_score = cls_score.detach().permute(0, 2, 3, 1)
        if self.use_sigmoid_cls:
            scores = cls_score.reshape(batch_size, -1).sigmoid()
        else:
            scores = cls_score.reshape(batch_size, -1, 2).softmax(-1)[..., 0]
        deltas = bbox_pred.detach().permute(0, 2, 3, 1).reshape(batch_size, -1, 4)
        if not is_dynamic_shape(ctx.cfg):
            anchors = anchors.data
        anchors = anchors.unsqueeze(0)
        if nms_pre > 0:  # mmdeploy's topk rewrite keeps all when there are fewer
            scores, topk_inds = scores.topk(nms_pre)
            deltas = gather_topk(deltas, inds=topk_inds, batch_size=batch_size, is_batched=True)
            anchors = gather_topk(anchors, inds=topk_inds, batch_size=batch_size,
                                  is_batched=False)
        mlvl_scores.append(scores)
        mlvl_deltas.append(deltas)
        mlvl_anchors_kept.append(anchors.expand(batch_size, -1, -1))
        mlvl_levels.append(torch.full_like(scores, level, dtype=torch.long))
    scores = torch.cat(mlvl_scores, 1)
    bboxes = get_box_tensor(self.bbox_coder.decode(
        torch.cat(mlvl_anchors_kept, 1), torch.cat(mlvl_deltas, 1),
        max_shape=batch_img_metas[0]['img_shape']))
    valid = torch.ones_like(scores, dtype=torch.bool)
    min_bbox_size = cfg.get('min_bbox_size', -1)
    if min_bbox_size >= 0:
        valid = ((bboxes[..., 2] - bboxes[..., 0]) > min_bbox_size) & (
            (bboxes[..., 3] - bboxes[..., 1]) > min_bbox_size)
    dets, _ = offset_nms(bboxes, scores, torch.cat(mlvl_levels, 1), valid, cfg.max_per_img,
                         cfg.nms.iou_threshold, DROPPED_SCORE / 2, DROPPED_SCORE)
    return dets, dets.new_zeros(dets.shape[:2], dtype=torch.long)


def standard_roi_head__predict_bbox__mmdet(self,
                                           x: Tuple[Tensor],
                                           batch_img_metas: List[dict],
                                           rpn_results_list: Sequence[Tensor],
                                           rcnn_test_cfg: ConfigDict,
                                           rescale: bool = False) -> Tuple[Tensor, Tensor]:
    """Rewrite of ``StandardRoIHead.predict_bbox``: mmdeploy's, except that the rows padding the
    proposals (score < 0) are classified as background only, so that no detection comes from
    them (mmdet has no such RoIs).

    Returns:
        dets (B, K, 5) and labels (B, K) of ``bbox_head.predict_by_feat``.
    """
    proposals = rpn_results_list[0]
    batch_size, num_proposals = proposals.shape[0], proposals.shape[1]
    batch_index = torch.arange(batch_size, device=proposals.device).float().view(-1, 1, 1)
    rois = torch.cat([batch_index.expand(batch_size, num_proposals, 1), proposals[..., :4]], -1)
    bbox_results = self._bbox_forward(x, rois.view(-1, 5))
    cls_scores = bbox_results['cls_score']
    if not self.bbox_head.custom_cls_channels:
        num_logits = cls_scores.shape[-1]
        is_background = torch.arange(num_logits, device=cls_scores.device) == num_logits - 1
        background = torch.where(is_background, cls_scores.new_zeros(()),
                                 cls_scores.new_full((), float('-inf')))
        cls_scores = torch.where(proposals[..., 4].reshape(-1, 1) >= 0, cls_scores, background)
    return self.bbox_head.predict_by_feat(
        rois=rois,
        cls_scores=cls_scores.reshape(batch_size, num_proposals, -1),
        bbox_preds=bbox_results['bbox_pred'].reshape(batch_size, num_proposals, -1),
        batch_img_metas=batch_img_metas,
        rcnn_test_cfg=rcnn_test_cfg,
        rescale=rescale)


def bbox_head__predict_by_feat__mmdet(self,
                                      rois: Tensor,
                                      cls_scores: Tensor,
                                      bbox_preds: Tensor,
                                      batch_img_metas: List[dict],
                                      rcnn_test_cfg: Optional[ConfigDict] = None,
                                      rescale: bool = False) -> Tuple[Tensor, Tensor]:
    """Rewrite of ``BBoxHead.predict_by_feat``: mmdet's ``multiclass_nms``.

    Every (RoI, class) pair above ``score_thr`` with its class's box, NMS within each class,
    the ``max_per_img`` best.

    Args:
        rois: (B, N, 5) (batch index, x1, y1, x2, y2).
        cls_scores: (B, N, num_classes + 1) logits.
        bbox_preds: (B, N, num_classes * 4) deltas, or (B, N, 4) if class agnostic.

    Returns:
        dets (B, K, 5) (x1, y1, x2, y2, score) in descending score order and labels (B, K);
        rows padding an image to the batch's K have score 0.
    """
    nms_cfg = None if rcnn_test_cfg is None else rcnn_test_cfg.get('nms')
    if (nms_cfg is None or nms_cfg.get('type', 'nms') != 'nms' or bbox_preds is None
            or self.bbox_coder.encode_size != 4 or rcnn_test_cfg.get('max_per_img', 0) <= 0):
        return bbox_head__predict_by_feat(self, rois, cls_scores, bbox_preds, batch_img_metas,
                                          rcnn_test_cfg, rescale)
    if self.custom_cls_channels:
        scores = self.loss_cls.get_activation(cls_scores)
    else:
        scores = F.softmax(cls_scores, dim=-1)
    batch_size = scores.shape[0]
    scores = scores[..., :self.num_classes]
    bboxes = get_box_tensor(self.bbox_coder.decode(
        rois[..., 1:], bbox_preds, max_shape=batch_img_metas[0]['img_shape']))
    bboxes = bboxes.reshape(batch_size, -1, 1 if self.reg_class_agnostic else self.num_classes, 4)
    bboxes = bboxes.expand(-1, -1, self.num_classes, -1).reshape(batch_size, -1, 4)
    labels = torch.arange(self.num_classes, device=scores.device).expand_as(scores)
    labels = labels.reshape(batch_size, -1)
    scores = scores.reshape(batch_size, -1)
    score_thr = rcnn_test_cfg.score_thr
    dets, inds = offset_nms(bboxes, scores, labels, scores > score_thr,
                            rcnn_test_cfg.max_per_img, nms_cfg.iou_threshold, score_thr, 0.0)
    labels = torch.where(inds >= 0, inds % self.num_classes, inds.new_zeros(()))
    return dets, labels


for _backend in NMS_BACKENDS:
    FUNCTION_REWRITER.register_rewriter(
        'mmdet.models.dense_heads.rpn_head.RPNHead.predict_by_feat',
        backend=_backend)(rpn_head__predict_by_feat__mmdet)
    FUNCTION_REWRITER.register_rewriter(
        'mmdet.models.roi_heads.standard_roi_head.StandardRoIHead.predict_bbox',
        backend=_backend)(standard_roi_head__predict_bbox__mmdet)
    FUNCTION_REWRITER.register_rewriter(
        'mmdet.models.roi_heads.bbox_heads.bbox_head.BBoxHead.predict_by_feat',
        backend=_backend)(bbox_head__predict_by_feat__mmdet)
