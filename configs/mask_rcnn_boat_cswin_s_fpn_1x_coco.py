"""Mask R-CNN + FPN + BOAT-CSWin-S on COCO: 1x schedule (12 epochs), bbox and segm mAP.

Paper: no reported number for this setting."""
_base_ = ['./_base_/mask_rcnn_fpn_1x_coco.py']
# ImageNet weights converted by tools/model_converters/boat2mmvit.py
pretrained = 'checkpoints/boat-cswin-s_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATCSWin',
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
