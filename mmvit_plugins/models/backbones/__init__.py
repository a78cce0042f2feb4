from .refiner_vit import RefinerViT
__all__ = []
__all__ += ['RefinerViT']
from .boat import BOATCSWin, BOATSwin  # noqa: E402
__all__ += ['BOATSwin', 'BOATCSWin']
from .maformer import MAFormer  # noqa: E402
__all__ += ['MAFormer']
