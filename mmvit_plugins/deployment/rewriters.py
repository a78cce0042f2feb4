"""mmdeploy rewriters of mmvit_plugins (importing this module registers them; needs mmdeploy).

``torch.nn.functional.adaptive_avg_pool2d`` for the onnxruntime backend: mmdeploy's default
rewrite turns it into ``avg_pool2d`` with ``kernel = stride = input // output``, which is exact
only when every output size divides the input size (UperNet's PPM scales 3 and 6 on the 16x16
map of a 512x512 image are not), fails when the output exceeds the input (``stride should not
be zero``), and keeps the traced size's kernels in a dynamic-shape export. Here the pooling is
:func:`~mmvit_plugins.deployment.pooling.exact_adaptive_avg_pool2d`: exact at every static size
and computed from the run-time size in a dynamic-shape export. A global pool (output 1x1) stays
PyTorch's (``GlobalAveragePool``).

``torch.nn.functional.scaled_dot_product_attention`` for the onnxruntime backend: mmdeploy's
default rewrite divides the logits by ``scale`` (PyTorch multiplies by it: an explicit scale
``d ** -0.5``, as BOAT's FSLA passes, sharpens the attention by a factor ``d`` instead of
flattening it by ``sqrt(d)``) and cannot take a boolean mask of more than one element
(``not attn_mask``). Here from opset 14 on torch's own symbolic
exports it (with the package's fix for an explicit scale,
:mod:`mmvit_plugins.utils.onnx_symbolics`); below, an explicit decomposition with PyTorch's
semantics.

Mask R-CNN's post-processing: see :mod:`mmvit_plugins.deployment.detection`.

``mmvit_plugins`` imports this module itself when mmdeploy was imported before it (as mmdeploy's
own ``tools/deploy.py`` does before it reads a model config that imports ``mmvit_plugins``), and
``tools/deployment/*.py`` import it explicitly.
"""
from typing import Optional, Sequence, Union

import torch
from mmdeploy.core import FUNCTION_REWRITER
from mmdeploy.utils import get_ir_config
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import detection  # noqa: F401  (registers the Mask R-CNN post-processing rewrites)
from .pooling import exact_adaptive_avg_pool2d

EXACT_POOLING_BACKENDS = ('onnxruntime', )
SDPA_BACKENDS = ('onnxruntime', )
_SDPA_SYMBOLIC_OPSET = 14  # torch's symbolic of aten::scaled_dot_product_attention


def adaptive_avg_pool2d__exact(input: Tensor,
                               output_size: Union[int, None, Sequence[Optional[int]]]) -> Tensor:
    """Rewrite of ``F.adaptive_avg_pool2d``: exact bins as matrix products (1x1: unchanged)."""
    ctx = FUNCTION_REWRITER.get_context()
    if _pair(output_size) == (1, 1):
        return ctx.origin_func(input, output_size)
    return exact_adaptive_avg_pool2d(input, output_size)


for _backend in EXACT_POOLING_BACKENDS:
    FUNCTION_REWRITER.register_rewriter(
        func_name='torch.nn.functional.adaptive_avg_pool2d',
        backend=_backend)(adaptive_avg_pool2d__exact)


def scaled_dot_product_attention__pytorch(query: Tensor,
                                          key: Tensor,
                                          value: Tensor,
                                          attn_mask: Optional[Tensor] = None,
                                          dropout_p: float = 0.0,
                                          is_causal: bool = False,
                                          scale: Optional[float] = None) -> Tensor:
    """Rewrite of ``F.scaled_dot_product_attention`` with PyTorch's semantics.

    Args:
        query: (..., L, E); key: (..., S, E); value: (..., S, Ev).
        attn_mask: bool (True: attend) or additive float mask broadcasting to (..., L, S).

    Returns:
        (..., L, Ev) attention output.
    """
    ctx = FUNCTION_REWRITER.get_context()
    if get_ir_config(ctx.cfg).get('opset_version', 11) >= _SDPA_SYMBOLIC_OPSET:
        return ctx.origin_func(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                               is_causal=is_causal, scale=scale)
    scale = query.shape[-1]**-0.5 if scale is None else scale
    logits = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    elif attn_mask is not None:
        logits = logits + attn_mask
    weights = torch.softmax(logits, dim=-1)
    if dropout_p > 0:
        weights = torch.dropout(weights, dropout_p, True)
    return weights @ value


for _backend in SDPA_BACKENDS:
    FUNCTION_REWRITER.register_rewriter(
        func_name='torch.nn.functional.scaled_dot_product_attention',
        backend=_backend)(scaled_dot_product_attention__pytorch)
