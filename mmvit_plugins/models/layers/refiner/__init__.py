"""Refiner-ViT's attention-map refiner (distributed local attention): the module and its
module-by-module formulation (:mod:`.reference`), the fused training Function
(:mod:`.batch_stats`) and inference path (:mod:`.folded`), the tiling behind them
(:mod:`.tiling`) and the choice between the paths (:mod:`.impl`)."""
from .impl import REFINER_IMPL_ENV, REFINER_IMPLS, refiner_impl_on, resolve_refiner_impl
from .reference import DistributedLocalAttention
from .tiling import DEFAULT_CHUNK_POLICY, ChunkPolicy, Tiling, padded_window_layout

__all__ = [
    'DEFAULT_CHUNK_POLICY', 'REFINER_IMPLS', 'REFINER_IMPL_ENV', 'ChunkPolicy',
    'DistributedLocalAttention', 'Tiling', 'padded_window_layout', 'refiner_impl_on',
    'resolve_refiner_impl'
]
