"""UperNet + MAFormer-T on ADE20K: 512x512 crops, 160k iterations, 150 classes,
mIoU.

Paper: no reported number for this setting.
No public checkpoint exists: trained from scratch unless you set init_cfg.
'tiny' is not a paper size: MAFormer blocks at Swin-T's widths and depths.
"""
_base_ = ['./_base_/upernet_ade20k_160k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='MAFormer',
        arch='tiny',
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
