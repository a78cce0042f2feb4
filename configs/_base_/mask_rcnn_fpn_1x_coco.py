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

# Test-time augmentation (tools/test.py --tta), as mmdet 3.x's *_tta.py configs define it: three
# scales x horizontal flip, boxes merged by DetTTAModel with NMS. DetTTAModel merges boxes only,
# so tools/test.py --tta tests these Mask R-CNN models without the mask head (bbox mAP).
tta_model = dict(
    type='DetTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
img_scales = [(1333, 800), (666, 400), (2000, 1200)]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=s, keep_ratio=True) for s in img_scales],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [dict(type='PackDetInputs',
                  meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                             'flip', 'flip_direction'))],
        ]),
]

# tools/train.py --auto-scale-lr: lr x (processes x batch_size) / base_batch_size (8 x 2 here).
auto_scale_lr = dict(enable=False, base_batch_size=16)
