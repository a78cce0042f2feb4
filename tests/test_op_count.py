"""mmvit_plugins.utils.op_count: what is counted and what is not."""
import torch

from mmvit_plugins.utils.op_count import HOST_SYNC_OPS, dispatched_ops


def test_counts_computing_operators_by_name():
    x = torch.randn(4, 6)
    assert dispatched_ops(lambda: x.view(6, 4).t().expand(2, 4, 6)) == {}
    assert dispatched_ops(lambda: torch.empty(3)) == {}
    assert dispatched_ops(lambda: (x + 1) * 2) == {'aten::add': 1, 'aten::mul': 1}
    assert sum(dispatched_ops(lambda: x.t().contiguous().sum()).values()) == 2


def test_host_synchronisations_are_seen():
    x = torch.randn(5)
    assert HOST_SYNC_OPS & set(dispatched_ops(lambda: bool((x > 0).any())))
    assert HOST_SYNC_OPS & set(dispatched_ops(lambda: x.masked_select(x > 0)))
    assert HOST_SYNC_OPS & set(dispatched_ops(lambda: x.max().item()))
    assert not HOST_SYNC_OPS & set(dispatched_ops(lambda: torch.where(x > 0, x, 0.)))
