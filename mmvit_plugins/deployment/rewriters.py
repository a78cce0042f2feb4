"""mmdeploy rewriters of mmvit_plugins (importing this module registers them; needs mmdeploy).

``torch.nn.functional.adaptive_avg_pool2d`` for the onnxruntime backend: mmdeploy's default
rewrite turns it into ``avg_pool2d`` with ``kernel = stride = input // output``, which is exact
only when every output size divides the input size (UperNet's PPM scales 3 and 6 on the 16x16
map of a 512x512 image are not), fails when the output exceeds the input (``stride should not
be zero``), and keeps the traced size's kernels in a dynamic-shape export. Here the pooling is
:func:`~mmvit_plugins.deployment.pooling.exact_adaptive_avg_pool2d`: exact at every static size
and computed from the run-time size in a dynamic-shape export. A global pool (output 1x1) stays
PyTorch's (``GlobalAveragePool``).

``mmvit_plugins`` imports this module itself when mmdeploy was imported before it (as mmdeploy's
own ``tools/deploy.py`` does before it reads a model config that imports ``mmvit_plugins``), and
``tools/deployment/*.py`` import it explicitly.
"""
from typing import Optional, Sequence, Union

from mmdeploy.core import FUNCTION_REWRITER
from torch import Tensor
from torch.nn.modules.utils import _pair

from .pooling import exact_adaptive_avg_pool2d

EXACT_POOLING_BACKENDS = ('onnxruntime', )


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
