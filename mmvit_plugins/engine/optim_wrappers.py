"""Mixed-precision training on CPU.

mmengine's ``AmpOptimWrapper`` refuses to start without an accelerator (it asserts CUDA, NPU, MLU
or MUSA). On CPU, autocast runs in bfloat16 only, and bfloat16 has float32's exponent range, so
no loss scaling is needed: ``CPUAmpOptimWrapper`` is mmengine's ``OptimWrapper`` with the
forward under ``mmengine.runner.amp.autocast(device_type='cpu', dtype=torch.bfloat16)``.
"""
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast
from mmengine.utils import apply_to
from torch import nn


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` (the model's forward in ``train_step``) runs under
    CPU bfloat16 autocast; backward and step as in ``OptimWrapper`` (no loss scale).

    Args:
        dtype: the autocast dtype; CPU autocast supports only ``'bfloat16'``.
        autocast_modules: names of submodules (``'backbone'``, ``'neck'``) that alone run under
            autocast, their floating-point outputs cast back to float32; ``None``: the whole
            forward. Detectors need it on CPU: mmcv's CPU kernels of NMS and RoIAlign have no
            bfloat16.
        **kwargs: ``OptimWrapper``'s arguments (optimizer, clip_grad, accumulative_counts).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16',
                 autocast_modules: Optional[Sequence[str]] = None, **kwargs) -> None:
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError(f'CPUAmpOptimWrapper: dtype={dtype!r} is not supported; allowed '
                             "values: 'bfloat16' (CPU autocast runs in bfloat16 only)")
        if autocast_modules is not None and (isinstance(autocast_modules, str)
                                             or not autocast_modules):
            raise ValueError(f'CPUAmpOptimWrapper: autocast_modules={autocast_modules!r}; '
                             "allowed values: None or a non-empty list of submodule names")
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16
        self.autocast_modules = None if autocast_modules is None else list(autocast_modules)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), ExitStack() as stack:
            if self.autocast_modules is None:
                stack.enter_context(autocast(device_type='cpu', dtype=self.cast_dtype))
            else:
                root = model.module if is_model_wrapper(model) else model
                for name in self.autocast_modules:
                    stack.enter_context(self._autocast_part(root, name))
            yield

    @contextmanager
    def _autocast_part(self, root: nn.Module, name: str) -> Iterator[None]:
        """Run ``root.<name>``'s forward under autocast, outputs in float32, while inside."""
        try:
            part = root.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in root.named_children()]
            raise ValueError(f'CPUAmpOptimWrapper: autocast_modules names {name!r}, which '
                             f'{type(root).__name__} does not have; allowed values: its '
                             f'submodules, e.g. {children}') from None
        own = part.__dict__.get('forward')
        part.forward = self._autocast_forward(part.forward)
        try:
            yield
        finally:
            if own is None:
                del part.forward
            else:
                part.forward = own

    def _autocast_forward(self, forward: Callable) -> Callable:
        def autocast_forward(*args, **kwargs) -> Any:
            with autocast(device_type='cpu', dtype=self.cast_dtype):
                out = forward(*args, **kwargs)
            return apply_to(out, lambda x: isinstance(x, torch.Tensor) and x.is_floating_point(),
                            lambda x: x.float())
        return autocast_forward
