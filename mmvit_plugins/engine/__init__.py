"""Training-loop pieces registered in mmengine's root registries: exact resume
(``RandomStateHook``), CPU mixed precision (``CPUAmpOptimWrapper``) and ``torch.compile`` in
training (``EagerOptimizerHook``, ``CompileModulesHook``)."""
from .compile import CompileModulesHook, EagerOptimizerHook, compile_options
from .hooks import RandomStateHook, capture_random_states, restore_random_states
from .optim_wrappers import CPUAmpOptimWrapper

__all__ = [
    'CPUAmpOptimWrapper', 'CompileModulesHook', 'EagerOptimizerHook', 'RandomStateHook',
    'capture_random_states', 'compile_options', 'restore_random_states'
]
