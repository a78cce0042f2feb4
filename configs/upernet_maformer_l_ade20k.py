"""UperNet + MAFormer-L on ADE20K: 512x512 crops, 160k iterations, 150 classes,
mIoU.

Paper: no reported number for this setting.
No public checkpoint exists: trained from scratch unless you set init_cfg.
"""
_base_ = ['./_base_/upernet_ade20k_160k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='MAFormer',
        arch='large',
        drop_path_rate=0.5),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
