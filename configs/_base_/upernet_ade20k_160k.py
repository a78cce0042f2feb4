"""UperNet on ADE20K, 512x512 crops, 160k iterations: what every ``upernet_*_ade20k.py`` shares.

Inherits mmseg's own base configs from the installed package. A backbone config only replaces
``model.backbone`` (with ``_delete_=True``) and sets the heads' ``in_channels`` to its widths.
Schedule as in Swin/CSWin: AdamW (lr 6e-5, weight decay 0.01; none on norms and position
tables), linear warm-up over 1500 iterations, then poly decay; batch 16 (8 GPUs x 2 images).
Heads use SyncBN (GPU runs); tools/train.py and tools/test.py switch it to BN without CUDA.
"""
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['mmvit_plugins'], allow_failed_imports=False)
# Checkpoints carry the random generators' state, for exact resume (docs/faq.md); with
# `compile=True` the optimizer step stays out of the compiled train_step
# (docs/compile_and_export.md).
custom_hooks = [dict(type='RandomStateHook'), dict(type='EagerOptimizerHook')]

num_classes = 150
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))

# No weight decay on normalization layers (any type) and on position tables.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
        }))

warmup_iters = 1500
max_iters = 160000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters,
         end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=16000)

train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

# Test-time augmentation (tools/test.py --tta), as mmseg's ade20k.py and default_runtime.py
# define it: six image scales x horizontal flip, logits averaged by SegTTAModel.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_model = dict(type='SegTTAModel')
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ]),
]

# tools/train.py --auto-scale-lr: lr x (processes x batch_size) / base_batch_size (8 x 2 here).
auto_scale_lr = dict(enable=False, base_batch_size=16)
