"""Mask R-CNN + FPN + MAFormer-T on COCO: 1x schedule (12 epochs), bbox and segm mAP.

Paper: no reported number for this setting.
No public checkpoint exists: trained from scratch unless you set init_cfg.
'tiny' is not a paper size: MAFormer blocks at Swin-T's widths and depths.
"""
_base_ = ['./_base_/mask_rcnn_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='MAFormer',
        arch='tiny',
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))
