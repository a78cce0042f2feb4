"""Mask R-CNN + FPN on COCO, 1x schedule (12 epochs): what every ``mask_rcnn_*_1x_coco.py``
shares.

Inherits mmdet's own base configs from the installed package. A backbone config only replaces
``model.backbone`` (with ``_delete_=True``) and sets ``model.neck.in_channels`` to its widths.
Schedule as in Swin/CSWin: AdamW (lr 1e-4, weight decay 0.05; none on norms and position
tables), 1000-iteration linear warm-up, steps at epochs 8 and 11; batch 16 (8 GPUs x 2 images);
bbox and segm mAP. The heads have no normalization layers (a BN inside a backbone is the
backbone's own ``norm_cfg``; tools/train.py switches SyncBN to BN without CUDA).
"""
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmvit_plugins'], allow_failed_imports=False)
# Checkpoints carry the random generators' state, for exact resume (docs/faq.md).
custom_hooks = [dict(type='RandomStateHook')]

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]

# No weight decay on normalization layers (any type) and on position tables.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
        }))
