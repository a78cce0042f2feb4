"""``torch.compile`` in mmengine training.

mmengine's ``compile`` option compiles the model's whole ``train_step``: data preprocessing,
forward, losses, backward and the optimizer step. ``EagerOptimizerHook`` makes that work for
segmentors, with the optimizer step left eager. A detector's training step cannot be captured
that way (proposal and sample counts depend on the data, and dynamo fails inside mmengine's
``InstanceData``), so for detectors ``CompileModulesHook`` compiles the parts with
data-independent shapes, backbone and neck.
"""
import inspect
from typing import Any, List, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict
from mmengine.registry import HOOKS


def compile_options(options: Any, name: str = 'compile') -> dict:
    """``options`` (``True`` or a dict of ``torch.compile`` keyword arguments) as a dict;
    anything else is a ``ValueError`` naming ``name`` and the allowed values."""
    if options is True:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f'{name}={options!r}; allowed values: True, False or a dict of '
                         'torch.compile keyword arguments, e.g. dict(backend="inductor")')
    allowed = [arg for arg in inspect.signature(torch.compile).parameters if arg != 'model']
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f'{name}={dict(options)!r}: unknown key(s) {unknown}; allowed: {allowed} '
                         '(the keyword arguments of torch.compile)')
    return dict(options)


@HOOKS.register_module()
class EagerOptimizerHook(Hook):
    """Run the optimizer wrapper's ``update_params`` (backward, gradient clipping, step,
    zero_grad) outside dynamo, so that a compiled ``train_step`` captures the model only.

    mmengine's ``compile`` option compiles the whole ``train_step``. Traced by dynamo (torch
    2.4.1), the optimizer step fails on mmengine's parameter groups (``ConfigDict``s:
    ``'UserDefinedObjectVariable' object has no attribute 'items'``); with plain-dict groups it is
    traced, but guarded on each group's float ``lr``, so every scheduler update (warm-up,
    poly decay: each iteration) recompiles it until dynamo's cache limit sends it back to eager.
    The backward of the compiled forward still runs AOT autograd's compiled graph.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        for each in wrapper.values() if isinstance(wrapper, OptimWrapperDict) else [wrapper]:
            each.update_params = torch._dynamo.disable(each.update_params)


@HOOKS.register_module()
class CompileModulesHook(Hook):
    """Compile submodules of the model in place (``nn.Module.compile``) before training.

    Args:
        modules: names of the model's children to compile, e.g. ``('backbone', 'neck')``.
        **options: ``torch.compile`` keyword arguments (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``, ``options``).

    Parameter names, state dicts and checkpoints are unchanged; validation and testing run the
    compiled modules too.
    """

    priority = 'VERY_LOW'

    def __init__(self, modules: Sequence[str] = ('backbone', 'neck'), **options: Any) -> None:
        if isinstance(modules, str) or not modules:
            raise ValueError(f'modules={modules!r}: expected a non-empty list of the model\'s '
                             "submodule names, e.g. ['backbone', 'neck']")
        self.modules: List[str] = list(modules)
        self.options = compile_options(options, 'CompileModulesHook options')

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        children = dict(model.named_children())
        missing = [name for name in self.modules if name not in children]
        if missing:
            raise ValueError(f'CompileModulesHook: modules={self.modules!r} names {missing}, '
                             f'which the model does not have; allowed: {sorted(children)}')
        for name in self.modules:
            children[name].compile(**self.options)
