"""Mask R-CNN + FPN + MAFormer-B on COCO: 1x schedule (12 epochs), bbox and segm mAP.

Paper: no reported number for this setting.
No public checkpoint exists: trained from scratch unless you set init_cfg.
"""
_base_ = ['./_base_/mask_rcnn_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='MAFormer',
        arch='base',
        drop_path_rate=0.3),
    neck=dict(in_channels=[64, 128, 256, 512]))
