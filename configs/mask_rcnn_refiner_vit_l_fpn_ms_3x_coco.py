"""Mask R-CNN + FPN + Refiner-ViT-L on COCO: 3x schedule
(36 epochs), multi-scale training, bbox and segm mAP.

Paper: no reported number for this setting."""
_base_ = ['./_base_/mask_rcnn_fpn_ms_3x_coco.py']
# ImageNet weights converted by tools/model_converters/refiner2mmvit.py
pretrained = 'checkpoints/refiner-vit-l_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RefinerViT',
        arch='large',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[512, 512, 512, 512]))
