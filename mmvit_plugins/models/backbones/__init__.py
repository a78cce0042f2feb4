from .boat import BOATCSWin, BOATSwin
from .maformer import MAFormer
from .refiner_vit import RefinerViT

__all__ = ['BOATCSWin', 'BOATSwin', 'MAFormer', 'RefinerViT']
