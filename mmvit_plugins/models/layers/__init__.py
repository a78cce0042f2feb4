from .attention import WindowMSA, masked_attention
from .embed import PatchMerging, resize_pos_embed
from .pyramid import LayerNorm2d, SimpleFeaturePyramid
from .window import (nchw_to_nhwc, nhwc_to_nchw, pad_to_multiple, window_partition,
                     window_reverse)

__all__ = [
    'WindowMSA', 'masked_attention', 'PatchMerging', 'resize_pos_embed', 'nchw_to_nhwc',
    'nhwc_to_nchw', 'pad_to_multiple', 'window_partition', 'window_reverse'
]
__all__ += ['LayerNorm2d', 'SimpleFeaturePyramid']
from .fsla import FeatureSpaceLocalAttention, balanced_clustering, group_layout  # noqa: E402
__all__ += ['FeatureSpaceLocalAttention', 'balanced_clustering', 'group_layout']
