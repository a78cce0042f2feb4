"""UperNet + BOAT-CSWin-T on ADE20K: 512x512 crops, 160k iterations, 150 classes,
mIoU.

Paper: 50.5 mIoU (BOAT, arXiv 2201.13027: UperNet, 160k, 512x512)."""
_base_ = ['./_base_/upernet_ade20k_160k.py']
# ImageNet weights converted by tools/model_converters/boat2mmvit.py
pretrained = 'checkpoints/boat-cswin-t_mmvit.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATCSWin',
        arch='tiny',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
