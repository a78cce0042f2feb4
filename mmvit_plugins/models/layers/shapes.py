"""Size arithmetic and padding that work for ints, SymInts and traced sizes.

A size is a Python int in eager code and in a graph that dynamo specialised on it, a SymInt in
a graph compiled with dynamic shapes, and a 0-d tensor in an ONNX trace. Size arithmetic written
with Python operators (``+ - * // %``) works on all three and stays symbolic; what depends on a
size's value (leaving out a mask, skipping a no-op resize, caching) is decided only in eager
code, so that every captured graph takes the general path.
"""
from functools import lru_cache, wraps
from typing import Any, Callable, Iterable, Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from .policy import Size, capturing, compiling, is_concrete


def _sizes(args: Iterable[Any]) -> Iterator[Size]:
    """The sizes among ``args`` and in their tuples."""
    for arg in args:
        if isinstance(arg, tuple):
            yield from _sizes(arg)
        elif isinstance(arg, (int, torch.SymInt, torch.Tensor)):
            yield arg


def size_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """``lru_cache`` for functions of sizes, bypassed while a graph is captured or for sizes
    that are not ints, whose results must be computed in the graph (a cached traced size would
    freeze one size into every later graph)."""
    def decorate(fn: Callable) -> Callable:
        cached = lru_cache(maxsize)(fn)

        @wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if capturing() or not is_concrete(*_sizes((*args, *kwargs.values()))):
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear
        return call
    return decorate


def contains(values: Iterable[Size], value: Size) -> bool:
    """``value in values`` for ints that dynamo may make symbolic (with ``dynamic=True`` it does
    so for modules' int attributes): torch 2.4's dynamo answers ``in`` on SymInts by identity
    and misses equal values; ``==`` compares them."""
    for item in values:
        if item == value:
            return True
    return False


def ceil_div(size: Size, divisor: int) -> Size:
    """``ceil(size / divisor)`` in floor divisions, the form dynamo's symbolic shapes reason
    about (they fail on the sign checks of ``-(-size // divisor)`` and ``-size % divisor``)."""
    return (size + divisor - 1) // divisor


def pad_to(size: Size, multiple: int) -> Size:
    """What padding ``size`` to a multiple of ``multiple`` adds (``-size % multiple``)."""
    return ceil_div(size, multiple) * multiple - size


def pad_end(x: torch.Tensor, pads: Sequence[Tuple[int, Size]], value: float = 0.) -> torch.Tensor:
    """Append ``pad`` entries of ``value`` at the end of dim ``dim`` of x, for every
    ``(dim, pad)`` of ``pads`` (pads >= 0).

    ``F.pad`` in eager code and ONNX traces. While dynamo compiles, the padded map is gathered
    from a clamped index instead: torch's padding decomposition branches on whether a pad is
    zero, which would specialise a graph with dynamic shapes on it (one graph for the sizes
    that need padding, another for those that do not). Both give the same values.
    """
    if not compiling():
        if is_concrete(*(pad for _, pad in pads)) and not any(pad for _, pad in pads):
            return x
        amounts = [0] * (2 * x.dim())
        for dim, pad in pads:
            amounts[2 * (x.dim() - 1 - dim % x.dim()) + 1] = pad
        return F.pad(x, amounts, value=value)
    for dim, pad in pads:
        size = x.shape[dim]
        index = torch.arange(size + pad, device=x.device)
        x = x.index_select(dim, index.clamp(max=size - 1))
        real = (index < size).view([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
        x = torch.where(real, x, torch.full((), value, dtype=x.dtype, device=x.device))
    return x


def crop_end(x: torch.Tensor, sizes: Sequence[Tuple[int, Size]]) -> torch.Tensor:
    """The first ``size`` entries of dim ``dim`` of x, for every ``(dim, size)`` of ``sizes``:
    what :func:`pad_end` added, removed.

    A view (slicing) in eager code and ONNX traces. While dynamo compiles, a gather of the kept
    entries instead: slicing returns x itself where nothing is cropped, and a reshape of the
    view depends on whether it is contiguous; both would specialise a graph with dynamic shapes
    on whether the map was padded. The gather gives a new contiguous tensor either way.
    """
    if not compiling():
        index = [slice(None)] * x.dim()
        for dim, size in sizes:
            index[dim] = slice(None, size)
        return x[tuple(index)]
    for dim, size in sizes:
        x = x.index_select(dim, torch.arange(size, device=x.device))
    return x
