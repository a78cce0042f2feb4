from .attention import WindowMSA
from .fsla import FeatureSpaceLocalAttention, balanced_clustering, group_layout
from .pyramid import SimpleFeaturePyramid
from .window import (
    attend_in_windows,
    pad_to_multiple,
    window_attention_mask,
    window_padding_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    'FeatureSpaceLocalAttention', 'SimpleFeaturePyramid', 'WindowMSA', 'attend_in_windows',
    'balanced_clustering', 'group_layout', 'pad_to_multiple', 'window_attention_mask',
    'window_padding_mask', 'window_partition', 'window_reverse'
]
