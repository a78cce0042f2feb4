"""Which implementation a refiner runs (``refiner_impl``): 'fused' the hand-written chunked
passes (:mod:`.batch_stats`, :mod:`.folded`), 'reference' the module-by-module formulation,
'auto' the one :func:`..policy.auto_refiner_impl` names for the input's device type."""
import os
from typing import Optional

import torch

from ..policy import auto_refiner_impl

REFINER_IMPLS = ('auto', 'fused', 'reference')
REFINER_IMPL_ENV = 'MMVIT_REFINER_IMPL'


def resolve_refiner_impl(impl: Optional[str] = None) -> str:
    """The refiner implementation a module built now uses: ``impl``, or when None the
    environment variable ``MMVIT_REFINER_IMPL`` (unset: ``'auto'``); checked."""
    name = 'refiner_impl'
    if impl is None:
        name, impl = REFINER_IMPL_ENV, os.environ.get(REFINER_IMPL_ENV) or 'auto'
    if impl not in REFINER_IMPLS:
        raise ValueError(f'{name}={impl!r} is invalid; allowed values: {REFINER_IMPLS}')
    return impl


def refiner_impl_on(impl: str, device: torch.device) -> str:
    """``'fused'`` or ``'reference'``: what ``impl`` (see :data:`REFINER_IMPLS`) runs on
    ``device``."""
    if impl != 'auto':
        return impl
    return auto_refiner_impl(device)
