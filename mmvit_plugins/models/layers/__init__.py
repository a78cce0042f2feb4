from .attention import ScaledDotProductAttention, WindowMSA
from .fsla import (
    BalancedClustering,
    FeatureSpaceLocalAttention,
    balanced_clustering,
    group_layout,
)
from .policy import capturing, is_concrete
from .pos_embed import resize_abs_pos_embed
from .pyramid import SimpleFeaturePyramid
from .resample import bicubic_weights, resample_to_grid, resample_weights
from .shapes import ceil_div, contains, crop_end, pad_end, pad_to
from .window import (
    attend_in_windows,
    pad_to_multiple,
    window_attention_mask,
    window_count,
    window_extent,
    window_padding_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    'BalancedClustering', 'FeatureSpaceLocalAttention', 'ScaledDotProductAttention',
    'SimpleFeaturePyramid', 'WindowMSA', 'attend_in_windows', 'balanced_clustering',
    'bicubic_weights', 'capturing', 'ceil_div', 'contains', 'crop_end', 'group_layout',
    'is_concrete', 'pad_end', 'pad_to', 'pad_to_multiple', 'resample_to_grid', 'resample_weights',
    'resize_abs_pos_embed', 'window_attention_mask', 'window_count', 'window_extent',
    'window_padding_mask', 'window_partition', 'window_reverse'
]
