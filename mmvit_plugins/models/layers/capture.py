"""Sizes in captured graphs.

A size is a Python int in eager code and in a graph that dynamo specialised on it, a SymInt in
a graph compiled with dynamic shapes, and a 0-d tensor in an ONNX trace. Size arithmetic written
with Python operators (``+ - * // %``) works on all three and stays symbolic; what depends on a
size's value (leaving out a mask, skipping a no-op resize, caching) is decided only for ints.
"""
from functools import lru_cache, wraps
from typing import Any, Callable, Iterable, Iterator, Union

import torch

Size = Union[int, torch.SymInt, torch.Tensor]


def capturing() -> bool:
    """A graph is being captured: compiled by dynamo or traced (ONNX export)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def is_concrete(*sizes: Size) -> bool:
    """Every size is known as a Python int: eager code, or a graph specialised on it."""
    return all(isinstance(size, int) for size in sizes)


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


def ceil_div(size: Size, divisor: int) -> Size:
    """``ceil(size / divisor)`` in floor divisions, the form dynamo's symbolic shapes reason
    about (they fail on the sign checks of ``-(-size // divisor)`` and ``-size % divisor``)."""
    return (size + divisor - 1) // divisor


def pad_to(size: Size, multiple: int) -> Size:
    """What padding ``size`` to a multiple of ``multiple`` adds (``-size % multiple``)."""
    return ceil_div(size, multiple) * multiple - size
