from mmvit_plugins.checkpoint import register_key_layouts

from .boat import BOATCSWin, BOATSwin
from .maformer import MAFormer
from .refiner_vit import RefinerViT

# The families checkpoints are told apart by, in the order messages name them.
register_key_layouts(layout for backbone in (BOATSwin, BOATCSWin, RefinerViT, MAFormer)
                     for layout in backbone.checkpoint_layouts)

__all__ = ['BOATCSWin', 'BOATSwin', 'MAFormer', 'RefinerViT']
