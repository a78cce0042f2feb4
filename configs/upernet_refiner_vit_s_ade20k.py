"""UperNet + Refiner-ViT-S on ADE20K: 512x512 crops, 160k iterations, 150 classes,
mIoU.

Paper: no reported number for this setting."""
_base_ = ['./_base_/upernet_ade20k_160k.py']
# ImageNet weights converted by tools/model_converters/refiner2mmvit.py
pretrained = 'checkpoints/refiner-vit-s_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RefinerViT',
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
