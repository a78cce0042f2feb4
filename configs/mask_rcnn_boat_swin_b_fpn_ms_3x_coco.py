"""Mask R-CNN + FPN + BOAT-Swin-B on COCO: 3x schedule
(36 epochs), multi-scale training, bbox and segm mAP.

Paper: no reported number for this setting."""
_base_ = ['./_base_/mask_rcnn_fpn_ms_3x_coco.py']
# ImageNet weights converted by tools/model_converters/boat2mmvit.py
pretrained = 'checkpoints/boat-swin-b_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATSwin',
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
