"""ONNX export fixes for torch's own operators, registered when the package is imported.

- torch 2.1-2.4's exporter of ``F.scaled_dot_product_attention`` fails for an explicit
  ``scale`` (it emits ``Sqrt`` of a Python float: ``z_(): incompatible function arguments``).
  The registered symbolic hands torch's own one the scale as a graph value; without ``scale``
  torch's symbolic runs unchanged.
- ``argsort(stable=True)`` has no symbolic (torch reads its ``stable`` flag as the dimension and
  fails: ``Out parameter is not supported``). ONNX's ``TopK`` is stable (equal values keep
  their order), so the stable overload exports as the plain one.
"""
import torch
from torch.onnx import register_custom_op_symbolic, symbolic_helper, symbolic_opset14

_SDPA = 'aten::scaled_dot_product_attention'
_ARGSORT = 'aten::argsort'
_SORT_OPSET = 11  # TopK with a run-time K and ascending order
_FIRST_OPSET = 14  # torch's SDPA symbolic
_CASTLIKE_OPSET = 15


@symbolic_helper.parse_args('v', 'v', 'v', 'v', 'f', 'b', 'v')
def _scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p: float,
                                  is_causal: bool, scale):
    if not symbolic_helper._is_none(scale):
        constant = g.op('Constant', value_t=torch.tensor(
            symbolic_helper._maybe_get_const(scale, 'f'), dtype=torch.float32))
        # not an onnx::Constant node, so torch's symbolic keeps it a graph value
        scale = (g.op('CastLike', constant, query) if g.opset >= _CASTLIKE_OPSET
                 else g.op('Identity', constant))
    return symbolic_opset14.scaled_dot_product_attention(
        g, query, key, value, attn_mask, dropout_p, is_causal, scale)


def _argsort(g, self, *args):
    """``aten::argsort(self, dim, descending)`` or ``aten::argsort.stable(self, stable, dim,
    descending)``."""
    dim, descending = args[-2:]
    _, indices = symbolic_helper._sort_helper(
        g, self, symbolic_helper._get_const(dim, 'i', 'dim'),
        decending=symbolic_helper._get_const(descending, 'i', 'descending'))
    return indices


def register_onnx_symbolics() -> None:
    """Register the fixes (idempotent)."""
    register_custom_op_symbolic(_SDPA, _scaled_dot_product_attention, _FIRST_OPSET)
    register_custom_op_symbolic(_ARGSORT, _argsort, _SORT_OPSET)
