"""Every decision made by device type, by capture state or by size concreteness.

Capture: while dynamo compiles or an ONNX trace runs (:func:`capturing`), the code takes the
general path, with no decision on a size's value. Device type: each choice below names the
device types it was measured on (docs/devices.md has the measurements). The choices stay
overridable where they are used: ``FeatureSpaceLocalAttention(static_shapes=...)``,
``refiner_impl`` (argument or ``MMVIT_REFINER_IMPL``), the refiner's ``chunk_policy``.
"""
from contextlib import AbstractContextManager, nullcontext
from typing import Dict, Tuple, Union

import torch

Size = Union[int, torch.SymInt, torch.Tensor]


# -- capture state -----------------------------------------------------------------------------
def compiling() -> bool:
    """dynamo is compiling a graph."""
    return torch.compiler.is_compiling()


def tracing() -> bool:
    """A graph is being traced (ONNX export)."""
    return torch.jit.is_tracing()


def capturing() -> bool:
    """A graph is being captured: compiled by dynamo or traced (ONNX export)."""
    return compiling() or tracing()


def is_concrete(*sizes: Size) -> bool:
    """Every size is a Python int of eager code. Never while a graph is captured: dynamo shows
    its SymInts to the traced code as ints (``isinstance(size, int)`` is True), and a decision
    on one would guard the graph on the value (one graph per size with ``dynamic=True``)."""
    return not capturing() and all(isinstance(size, int) for size in sizes)


# -- autocast and random state -----------------------------------------------------------------
# The device types torch implements autocast for, asked once at import: dynamo does not trace
# ``torch.amp.is_autocast_available``. A backend that registers later is asked in eager code.
_AUTOCAST_DEVICE_TYPES = tuple(
    device_type for device_type in ('cpu', 'cuda', 'xpu', 'hpu', 'mps', 'xla', 'ipu', 'mtia',
                                    torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(device_type))


def has_autocast(device_type: str) -> bool:
    """torch implements autocast on this device type (``meta`` has none: asking for its state
    or turning it off raises)."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return True
    return not capturing() and torch.amp.is_autocast_available(device_type)


def autocast_off(device: torch.device) -> AbstractContextManager:
    """``torch.autocast(device.type, enabled=False)``; nothing to turn off on a device type
    without autocast."""
    if has_autocast(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype every output of a forward has: autocast's where it is on, else the input's."""
    device = x.device.type
    if not has_autocast(device):
        return x.dtype
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4: one API for every device type
        enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    elif device == 'cpu':
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else x.dtype


def has_rng_state(device: torch.device) -> bool:
    """The device type has a random state for activation checkpointing to save and restore
    (the CPU's, ``torch.<type>.get_rng_state`` of CUDA and the like); ``meta`` has none."""
    return device.type == 'cpu' or hasattr(getattr(torch, device.type, None), 'get_rng_state')


# -- BOAT's clustering (layers/fsla.py) ----------------------------------------------------------
def clustering_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 features and on devices whose float32 products may run in TF32
    (every device but the CPU and MPS); else float32."""
    if x.dtype == torch.float64 or x.device.type not in ('cpu', 'mps'):
        return torch.float64
    return torch.float32


def static_group_layout(device: torch.device) -> bool:
    """Whether FSLA's groups take the static layout (shapes of the whole padded sequence)
    rather than the tight one by default: the tight layout is for eager CPU code, a captured
    graph wants static shapes."""
    return device.type != 'cpu' or capturing()


# -- Refiner-ViT (backbones/refiner_vit.py, layers/refiner/) ------------------------------------
def channels_last_on(device: torch.device) -> bool:
    """Whether Refiner-ViT's stem and the pyramid's inputs use channels-last maps and the
    stem's last conv runs as one matrix product: measured faster on the CPU (oneDNN) only."""
    return device.type == 'cpu'


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the refiner's sums of statistics: float64, float32 on ``mps`` (which has
    no float64)."""
    return torch.float32 if device.type == 'mps' else torch.float64


# What ``refiner_impl='auto'`` runs per device type: 'cpu' measured, the fused path is faster
# there and needs less memory. Elsewhere not measured: 'fused' for its bounded training
# memory, although it dispatches more operators (kernel launches) than 'reference'.
AUTO_REFINER_IMPL: Dict[str, str] = {'cpu': 'fused'}
AUTO_REFINER_IMPL_DEFAULT = 'fused'


def auto_refiner_impl(device: torch.device) -> str:
    """``'fused'`` or ``'reference'``: what ``refiner_impl='auto'`` runs on ``device``."""
    return AUTO_REFINER_IMPL.get(device.type, AUTO_REFINER_IMPL_DEFAULT)


# The defaults of the refiner's ``ChunkPolicy`` (layers/refiner/tiling.py). On the CPU ~4 MB
# of the 3x-expanded map per chunk, so that chunks stay in the caches and in the allocator's
# reused heap (a fresh map-sized tensor costs a page fault per 4 KB, more than the arithmetic
# on it, so 4 MB chunks train faster than 8 MB ones); elsewhere a chunk bounds the peak memory
# of large global maps at a few launches. Pieces are written back with one ``index_copy_``
# per window on the CPU (measured faster: 24 against 28 ms for the write-backs of a training
# step of an all-windowed Refiner-ViT-S at 512x512), elsewhere with one operation over the
# flattened maps (one kernel launch instead of one per window).
CHUNK_ELEMENTS: Dict[str, int] = {'cpu': 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 26
SCATTER_PER_WINDOW_ON: Tuple[str, ...] = ('cpu', )
