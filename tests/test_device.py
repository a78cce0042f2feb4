"""Every backbone on a device other than the CPU, on a machine without one: the ``meta`` device
takes every branch a non-CPU device takes (static cluster shapes, chunk sizes, layouts), refuses
tensors of mixed devices and holds no data, so all families run in seconds. Also: compiled
graphs hold no CPU node, and (a static check of the source) every tensor factory outside a
constructor names its device."""
import ast
import math
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
from torch.utils import _pytree as pytree

from mmvit_plugins.models import backbones
from mmvit_plugins.models.layers.policy import autocast_off, has_autocast
from mmvit_plugins.models.layers.pyramid import PYRAMID_STRIDES
from tests.conftest import TINY_BACKBONES

from .helpers import ROOT

META = torch.device('meta')
NAMES = sorted(backbones.__all__)
# an even size and an odd one
SIZES = ((64, 96), (61, 75))
TIMM_MODELS = {'BOATSwin': 'boat_swin_tiny', 'BOATCSWin': 'boat_cswin_tiny',
               'MAFormer': 'maformer_tiny', 'RefinerViT': 'refiner_vit_s'}
TRAIN_OPTIONS = (dict(), dict(with_cp=True), dict(frozen_stages=1))


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(backbones, name)(**{**TINY_BACKBONES[name], **kwargs}).to(META)


def expected_shapes(model: torch.nn.Module, batch: int,
                    hw: Tuple[int, int]) -> List[Tuple[int, ...]]:
    """(B, C_i, ceil(H / s_i), ceil(W / s_i)) of every output."""
    return [(batch, model.num_features[i], *(math.ceil(size / PYRAMID_STRIDES[i]) for size in hw))
            for i in model.out_indices]


def assert_on_meta(tensors: Sequence[torch.Tensor]) -> None:
    assert tensors
    assert all(t.device == META for t in tensors), [t.device for t in tensors]


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('name', NAMES)
def test_eval_forward_on_meta(name, hw):
    model = on_meta(name).eval()
    with torch.no_grad():
        outs = model(torch.empty(2, 3, *hw, device=META))
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, 2, hw)
    assert_on_meta(outs)
    assert all(o.dtype == torch.float32 for o in outs)


def trained_grads(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The outputs' sum backpropagated; the gradient of every trained parameter and of x."""
    outs = model(x)
    sum(o.sum() for o in outs).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    return [*outs, x.grad, *(p.grad for p in params)]


@pytest.fixture
def meta_device_module(monkeypatch):
    """torch 2.4's activation checkpointing looks up the module ``torch.<device type>`` (for
    its random state) of its inputs, which ``meta`` lacks: an empty one stands in (no random
    state: :func:`~mmvit_plugins.models.backbones.base.has_rng_state` is False)."""
    if getattr(torch, 'meta', None) is None:
        monkeypatch.setattr(torch, 'meta', types.ModuleType('torch.meta'), raising=False)


@pytest.mark.parametrize('options', TRAIN_OPTIONS, ids=['plain', 'with_cp', 'frozen_stages'])
@pytest.mark.parametrize('name', NAMES)
def test_training_step_on_meta(name, options, meta_device_module):
    model = on_meta(name, drop_path_rate=0.1, **options).train()
    x = torch.empty(2, 3, *SIZES[1], device=META, requires_grad=True)
    assert_on_meta(trained_grads(model, x))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert bool(frozen) == ('frozen_stages' in options)
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize('name', NAMES)
def test_timm_model_on_meta(name):
    """One timm classifier per family: eval logits, and a training step's gradients."""
    from tests.test_timm_models import _create
    torch.manual_seed(0)
    model = _create(TIMM_MODELS[name], num_classes=10).to(META)
    x = torch.empty(2, 3, *SIZES[1], device=META, requires_grad=True)
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (2, 10) and logits.device == META
    model.train()
    logits = model(x)
    logits.sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    assert_on_meta([logits, x.grad, *(p.grad for p in params)])


def test_autocast_is_left_alone_where_a_device_has_none():
    """``meta`` has no autocast: the float32 islands (BOAT's clustering, Refiner-ViT's maps)
    turn off nothing there (torch.autocast('meta') raises); on the CPU they turn it off."""
    assert has_autocast('cpu') and not has_autocast('meta')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with autocast_off(torch.device('cpu')):
            assert not torch.is_autocast_enabled('cpu')
        with autocast_off(META):
            assert torch.is_autocast_enabled('cpu')


# -- compiled graphs --------------------------------------------------------------------------
def cpu_nodes(gm: torch.fx.GraphModule) -> List[str]:
    """Nodes whose value (dynamo's ``example_value``) holds a CPU tensor, or that make a tensor
    with ``device=cpu``."""
    found = []
    for node in gm.graph.nodes:
        values = pytree.tree_leaves(node.meta.get('example_value'))
        on_cpu = any(isinstance(v, torch.Tensor) and v.device.type == 'cpu' for v in values)
        device = node.kwargs.get('device')
        if on_cpu or (device is not None and torch.device(device).type == 'cpu'):
            found.append(node.format_node())
    return found


@pytest.mark.parametrize('name', NAMES)
def test_compiled_graph_holds_no_cpu_node(name):
    """``fullgraph=True`` on meta: no node of the forward's graph makes or holds a CPU tensor
    (CUDA graphs skip a graph with one, and each call would copy to the GPU). The backward's
    graph is derived from these nodes."""
    model = on_meta(name).eval()
    graphs: List[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        outs = torch.compile(model, backend=keep, fullgraph=True)(
            torch.empty(2, 3, *SIZES[1], device=META))
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, 2, SIZES[1])
    assert_on_meta(outs)
    (gm, ) = graphs
    assert any(node.meta.get('example_value') is not None for node in gm.graph.nodes)
    assert not cpu_nodes(gm), cpu_nodes(gm)


# -- static check: tensor factories name their device ----------------------------------------
PACKAGE = ROOT / 'mmvit_plugins'
# torch functions that make a tensor from sizes or Python values: on the CPU unless ``device=``
# says otherwise (``*_like`` and ``Tensor.new_*`` take their input's device and are not here)
FACTORIES = frozenset({
    'arange', 'range', 'linspace', 'logspace', 'zeros', 'ones', 'full', 'empty',
    'empty_strided', 'eye', 'tensor', 'as_tensor', 'asarray', 'scalar_tensor', 'rand', 'randn',
    'randint', 'randperm', 'normal', 'tril_indices', 'triu_indices', 'from_numpy',
    'frombuffer', 'sparse_coo_tensor', 'hann_window', 'hamming_window', 'bartlett_window',
    'blackman_window', 'kaiser_window'})
# Functions that never run in a forward, each with the reason: (file under mmvit_plugins/,
# qualified function name) -> why.
NOT_FORWARD_CODE: Dict[Tuple[str, str], str] = {
    ('deployment/agreement.py', 'detection_agreement'):
        'scores the outputs of an exported model against PyTorch on the host',
    ('engine/hooks.py', 'capture_random_states'):
        "saves numpy's random state into a checkpoint (host data)",
    ('utils/onnx_symbolics.py', '_scaled_dot_product_attention'):
        'an ONNX symbolic: its tensors become constants of the exported graph',
}


def factory_calls(tree: ast.AST) -> Iterator[Tuple[str, int, str]]:
    """(qualified function name, line, factory) of every factory call without ``device=``
    outside constructors (``__init__``); module-level calls are named ``<module>``."""
    imported = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == 'torch'
                for alias in node.names if alias.name in FACTORIES}

    def visit(node: ast.AST, scope: Tuple[str, ...]) -> Iterator[Tuple[str, int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name != '__init__':
                    yield from visit(child, scope + (child.name, ))
                continue
            if isinstance(child, ast.Call):
                func = child.func
                name = (func.attr if isinstance(func, ast.Attribute)
                        and isinstance(func.value, ast.Name) and func.value.id == 'torch'
                        and func.attr in FACTORIES else
                        imported.get(func.id) if isinstance(func, ast.Name) else None)
                if name and not any(k.arg == 'device' for k in child.keywords):
                    yield '.'.join(scope) or '<module>', child.lineno, name
            yield from visit(child, scope)
    yield from visit(tree, ())


def undeviced_factories(package: Path) -> List[Tuple[str, str, int, str]]:
    """(file, function, line, factory) of every factory call without ``device=`` in forward
    code (everything but constructors and NOT_FORWARD_CODE)."""
    found = []
    for path in sorted(package.rglob('*.py')):
        relative = path.relative_to(package).as_posix()
        for function, line, factory in factory_calls(ast.parse(path.read_text())):
            if (relative, function) not in NOT_FORWARD_CODE:
                found.append((relative, function, line, factory))
    return sorted(found, key=lambda call: (call[0], call[2]))


def test_every_tensor_factory_in_forward_code_names_its_device():
    """A tensor made without ``device=`` is a CPU tensor: in a GPU forward it fails (mixed
    devices) or, moved over, puts CPU operations and a copy into every compiled graph."""
    assert not undeviced_factories(PACKAGE)


def test_exemptions_are_needed():
    """Every NOT_FORWARD_CODE entry names a function that makes a tensor without a device."""
    calls = {(path.relative_to(PACKAGE).as_posix(), function)
             for path in PACKAGE.rglob('*.py')
             for function, _, _ in factory_calls(ast.parse(path.read_text()))}
    assert set(NOT_FORWARD_CODE) <= calls, set(NOT_FORWARD_CODE) - calls


def test_static_check_finds_factories_without_device(tmp_path):
    (tmp_path / 'layer.py').write_text(
        'import torch\nfrom torch import arange as ar\n'
        'TABLE = torch.eye(3)\n'
        'class A:\n'
        '    def __init__(self):\n'
        '        self.w = torch.zeros(3)\n'
        '    def forward(self, x):\n'
        '        def inner():\n'
        '            return ar(4)\n'
        '        return torch.zeros(3).to(x.device) + torch.ones(3, device=x.device) + inner()\n'
        '    def rows(self, x):\n'
        '        return torch.tensor([1], dtype=torch.long) + x.new_zeros(1)\n')
    assert undeviced_factories(tmp_path) == [
        ('layer.py', '<module>', 3, 'eye'), ('layer.py', 'A.forward.inner', 9, 'arange'),
        ('layer.py', 'A.forward', 10, 'zeros'), ('layer.py', 'A.rows', 12, 'tensor')]
