"""UperNet + Refiner-ViT-S on ADE20K with layer-wise learning-rate decay: 512x512 crops, 160k
iterations, 150 classes, mIoU.

The plain-ViT fine-tuning recipe (BEiT, MAE, ViTDet) instead of the Swin schedule of
``upernet_refiner_vit_s_ade20k.py``: AdamW lr 1e-4, weight decay 0.05 (as mmseg's MAE-B UperNet
config), and ``LayerDecayOptimWrapperConstructor``: block i of the 16 trains at
lr x 0.75 ** (16 - i), the patch/position embedding at lr x 0.75 ** 17 = 0.0075 lr, the pyramid,
out norms and heads at lr; no weight decay on 1-D parameters and position embeddings.

Rate 0.75 for 16 blocks: ViTDet uses 0.7 for ViT-B (12 blocks) and 0.8 for ViT-L (24 blocks),
which interpolates to 0.73 at 16 blocks, and its embedding multipliers are 0.7 ** 13 = 0.0097
(B) and 0.8 ** 25 = 0.0038 (L): 0.75 ** 17 = 0.0075 lies between them, as 16 blocks lie between
12 and 24. (BEiT/MAE use 0.65 for ViT-B on ADE20K, 0.65 ** 13 = 0.0037.)

Paper: no reported number for this setting."""
_base_ = ['./upernet_refiner_vit_s_ade20k.py']
num_layers = 16  # RefinerViT('small'): 16 blocks
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.75))
