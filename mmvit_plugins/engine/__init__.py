"""Training-loop pieces registered in mmengine's root registries: exact resume
(``RandomStateHook``) and CPU mixed precision (``CPUAmpOptimWrapper``)."""
from .hooks import RandomStateHook, capture_random_states, restore_random_states
from .optim_wrappers import CPUAmpOptimWrapper

__all__ = [
    'CPUAmpOptimWrapper', 'RandomStateHook', 'capture_random_states', 'restore_random_states'
]
