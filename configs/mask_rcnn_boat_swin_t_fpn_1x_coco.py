"""Mask R-CNN + FPN + BOAT-Swin-T on COCO: 1x schedule (12 epochs), bbox and segm mAP.

Paper: no reported number for this setting."""
_base_ = ['./_base_/mask_rcnn_fpn_1x_coco.py']
# ImageNet weights converted by tools/model_converters/boat2mmvit.py
pretrained = 'checkpoints/boat-swin-t_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATSwin',
        arch='tiny',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
