"""Which aten operators a piece of code dispatches: a device-independent measure of launch cost.

On a GPU each counted operator is about one kernel launch; where launching is slower than the
kernels run (small inputs, many small kernels), latency follows this count rather than FLOPs.
"""
from collections import Counter
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that compute nothing: detaching and bare allocations (views are excluded too)
FREE_OPS = frozenset({'aten::_unsafe_view', 'aten::alias', 'aten::detach', 'aten::lift_fresh',
                      'aten::empty', 'aten::empty_like', 'aten::empty_strided',
                      'aten::new_empty'})
# operators that copy a device value to the host, so the host waits for the device (boolean-mask
# indexing also waits, inside aten::index, and is not told apart by name)
HOST_SYNC_OPS = frozenset({'aten::_local_scalar_dense', 'aten::item', 'aten::is_nonzero',
                           'aten::nonzero', 'aten::masked_select', 'aten::equal'})


class _OpCounter(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not func.is_view and name not in FREE_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> Counter:
    """Run ``fn()`` and count, by name (``'aten::add'``), the operators it dispatches on this
    thread, views and :data:`FREE_OPS` excluded."""
    with _OpCounter() as counter:
        fn()
    return counter.ops
