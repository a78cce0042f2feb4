from .attention import WindowMSA, masked_attention
from .embed import PatchMerging, resize_pos_embed
from .fsla import FeatureSpaceLocalAttention, balanced_clustering, group_layout
from .mlp import Mlp
from .pyramid import LayerNorm2d, SimpleFeaturePyramid
from .window import (
                     nhwc_to_nchw,
                     pad_to_multiple,
                     window_padding_mask,
                     window_partition,
                     window_reverse,
)

__all__ = [
    'FeatureSpaceLocalAttention', 'LayerNorm2d', 'Mlp', 'PatchMerging', 'SimpleFeaturePyramid',
    'WindowMSA', 'balanced_clustering', 'group_layout', 'masked_attention', 'nhwc_to_nchw',
    'pad_to_multiple', 'resize_pos_embed', 'window_padding_mask', 'window_partition',
    'window_reverse'
]
