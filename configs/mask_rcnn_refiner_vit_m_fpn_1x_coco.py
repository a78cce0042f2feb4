"""Mask R-CNN + FPN + Refiner-ViT-M on COCO: 1x schedule (12 epochs), bbox and segm mAP.

Paper: no reported number for this setting."""
_base_ = ['./_base_/mask_rcnn_fpn_1x_coco.py']
# ImageNet weights converted by tools/model_converters/refiner2mmvit.py
pretrained = 'checkpoints/refiner-vit-m_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RefinerViT',
        arch='medium',
        # Detection-size inputs (~800x1216, N = 3800 tokens): the refiner's convs over a global
        # N x N map need ~32 GB per global pair at batch 2 (docs/backbones/refiner_vit.md), so
        # every block attends in 14x14 windows here, with gradient checkpointing.
        global_attn_indexes=(),
        with_cp=True,
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[420, 420, 420, 420]))
