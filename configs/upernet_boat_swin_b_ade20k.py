"""UperNet + BOAT-Swin-B on ADE20K: 512x512 crops, 160k iterations, 150 classes,
mIoU.

Paper: no reported number for this setting."""
_base_ = ['./_base_/upernet_ade20k_160k.py']
# ImageNet weights converted by tools/model_converters/boat2mmvit.py
pretrained = 'checkpoints/boat-swin-b_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATSwin',
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
