"""BOAT backbones: BOAT-Swin and BOAT-CSWin (Yu et al., "BOAT: Bilateral Local Attention Vision
Transformer", arXiv 2201.13027), for dense prediction at any input size.

Each block runs an image-space local attention (Swin windows or CSWin stripes), then the
feature-space local attention (FSLA) of :mod:`mmvit_plugins.models.layers.fsla`, then an MLP.
Public checkpoints (github.com/mahaoyuHKU/pytorch-boat) load through ``convert_checkpoint``.
"""
import math
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from timm.layers import DropPath, Mlp, PatchEmbed, resize_rel_pos_bias_table_simple
from timm.models.swin_transformer import PatchMerging
from torch import nn

from mmvit_plugins.checkpoint import KeyLayout

from ..layers import (
    FeatureSpaceLocalAttention,
    WindowMSA,
    attend_in_windows,
    ceil_div,
    crop_end,
    pad_end,
    pad_to,
    pad_to_multiple,
    window_count,
    window_extent,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from ..layers.fsla import num_levels
from .base import (
    PyramidBackbone,
    Stage,
    WindowStage,
    check_block_options,
    check_choice,
    check_int,
    check_number,
    check_pyramid_arch,
    output_dtype,
    resolve_arch,
    stage_rates,
)

_ARCH_KEYS = ('embed_dims', 'depths', 'num_heads')

# Applied in order with re.sub; a None replacement drops the key.
_SWIN_RULES = (
    (r'^head\.', None),
    (r'\.attn_mask$', None),
    (r'^norm\.', 'out_norm3.'),
    (r'^layers\.', 'stages.'),
    (r'\.attnC\.', '.fsla.'),
    (r'\.get_v\.', '.lepe.'),
    (r'\.norm4\.', '.fsla_norm.'),
)
_SWIN_LAYOUTS = (
    KeyLayout('BOAT-Swin, public layout', r'^layers\.\d+\.blocks\.\d+\.attnC\.',
              r'^layers\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    KeyLayout('BOAT-Swin, converted layout',
              r'^stages\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$',
              r'^stages\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
)

_CSWIN_RULES = (
    (r'^head\.', None),
    (r'^norm\.', 'out_norm3.'),
    (r'^stage1_conv_embed\.0\.', 'patch_embed.proj.'),
    (r'^stage1_conv_embed\.2\.', 'patch_embed.norm.'),
    (r'^stage(\d)\.(\d+)\.', lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'),
    (r'^merge(\d)\.', lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (r'(blocks\.\d+)\.(qkv|proj)\.', r'\1.attn.\2.'),
    (r'\.attns\.(\d+)\.get_v\.', r'.attn.lepe.\1.'),
    (r'\.content_attn\.', '.fsla.'),
    (r'\.get_v\.', '.lepe.'),
    (r'\.norm3\.', '.fsla_norm.'),
)
_CSWIN_LAYOUTS = (
    KeyLayout('BOAT-CSWin, public layout', r'^stage\d\.\d+\.content_attn\.',
              r'^stage(\d)\.(\d+)\.', 'stage1_conv_embed.0.weight'),
    KeyLayout('BOAT-CSWin, converted layout', r'^stages\.\d+\.blocks\.\d+\.attn\.lepe\.\d+\.',
              r'^stages\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
)


MakeFSLA = Callable[[int, int], FeatureSpaceLocalAttention]


def fsla_builder(group_size: int, overlap: int, qk_scale: Optional[float], qkv_bias: bool,
                 proj_drop: float) -> MakeFSLA:
    """Checked FSLA options (``fsla_*`` arguments of the backbones) -> ``make(dim, heads)``."""
    group_size = check_int('fsla_group_size', group_size, low=2)
    overlap = check_int('fsla_overlap', overlap, 0, group_size)
    if qk_scale is not None:
        check_number('fsla_qk_scale', qk_scale, 0., math.inf, include_low=False)
    return partial(FeatureSpaceLocalAttention, group_size=group_size, overlap=overlap,
                   qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop)


class _FSLAMixin:
    """The FSLA branch of a block: ``x + fsla(fsla_norm(x))`` on (B, H, W, C) maps."""
    fsla: Optional[FeatureSpaceLocalAttention]
    fsla_norm: Optional[nn.LayerNorm]

    def _add_fsla(self, dim: int, fsla: Optional[FeatureSpaceLocalAttention]) -> None:
        self.fsla_norm = nn.LayerNorm(dim) if fsla is not None else None
        self.fsla = fsla

    def _fsla_branch(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return self.fsla(self.fsla_norm(x).reshape(b, h * w, c), (h, w)).view(b, h, w, c)


# --------------------------------------------------------------------------------------------
# BOAT-Swin
# --------------------------------------------------------------------------------------------
class BOATSwinBlock(_FSLAMixin, nn.Module):
    """Swin block (shifted or not) with optional FSLA after the window attention; (B, H, W, C).

    As in the public code: ``x = x + dp(wmsa(norm1(x)))``, then ``x = x + fsla(fsla_norm(x))``
    (no drop-path), then ``x = x + dp(mlp(norm2(x)))``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool,
                 fsla: Optional[FeatureSpaceLocalAttention], mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowMSA(dim, num_heads, window_size, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=drop)
        self._add_fsla(dim, fsla)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, shift_size: int,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        y = attend_in_windows(self.attn, self.norm1(x), self.window_size, shift_size, attn_mask)
        x = x + self.drop_path(y)
        if self.fsla is not None:
            x = x + self._fsla_branch(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _rename(state_dict: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    """Apply the ``(pattern, replacement)`` rules in order; a None replacement drops the key."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            if re.search(pattern, key) is None:
                continue
            if replacement is None:
                key = None
                break
            key = re.sub(pattern, replacement, key)
        if key is not None:
            out[key] = value
    return out


def _resize_bias_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """((2w-1)**2, heads) -> ((2w'-1)**2, heads), bicubic over the relative offsets (timm).

    A table that is not of that form, or has another head count, is returned unchanged: the
    load report then lists it as a shape mismatch.
    """
    side = math.isqrt(table.shape[0]) if table.dim() == 2 else 0
    dst_side = math.isqrt(shape[0])
    if (side * side != table.shape[0] or side % 2 == 0 or table.shape[1] != shape[1]
            or dst_side * dst_side != shape[0] or dst_side % 2 == 0):
        return table
    window = ((dst_side + 1) // 2, ) * 2
    return resize_rel_pos_bias_table_simple(table.float(), window, tuple(shape)).to(table.dtype)


class _BOATBackbone(PyramidBackbone):
    """What BOAT-Swin and BOAT-CSWin share: public key rules, renaming of public checkpoints."""
    public_key_rules: Tuple[Tuple[str, object], ...] = ()

    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return _rename(state_dict, self.public_key_rules)

    def unbuilt_key_prefixes(self) -> Tuple[str, ...]:
        """As the base, and the downsampling after the last stage built (the next stage's
        input)."""
        last = self.num_stages - 1
        downsample = (f'stages.{last}.downsample.', ) if last < 3 else ()
        return super().unbuilt_key_prefixes() + downsample

    def fsla_levels(self, hw: Tuple[int, int]) -> Tuple[int, ...]:
        """Per stage built, the clustering levels of its FSLA for an (H, W) input (0: one
        group, or no FSLA). A graph exported (ONNX) at one input size serves exactly the sizes
        with the same levels; a graph compiled with dynamic shapes guards on them."""
        levels = []
        h, w = ceil_div(hw[0], 4), ceil_div(hw[1], 4)
        for stage in self.stages:
            fsla = next((block.fsla for block in stage.blocks if block.fsla is not None), None)
            levels.append(0 if fsla is None else num_levels(h * w, fsla.group_size))
            h, w = ceil_div(h, 2), ceil_div(w, 2)
        return tuple(levels)


@MODELS.register_module()
class BOATSwin(_BOATBackbone):
    """BOAT-Swin: Swin Transformer with feature-space local attention in its shifted blocks.

    Args:
        arch: ``'tiny'``/``'small'``/``'base'`` (aliases ``'t'``/``'s'``/``'b'``) or a dict
            with ``embed_dims``, ``depths`` (4), ``num_heads`` (4).
        window_size: Swin window (and FSLA group size ``window_size ** 2`` by default).
        pretrain_img_size: decides which stages have FSLA, as the public models at this input:
            a stage whose map fits in one window there has no shift and hence no FSLA (at 224:
            stages 0-2 have FSLA in their odd blocks, stage 3 none). Parameters never depend
            on the input size; at run time a stage shifts its odd blocks only when its map is
            larger than one window.
        fsla_group_size / fsla_overlap / fsla_qk_scale: FSLA options (defaults: ws ** 2, 20,
            head_dim ** -0.5 as in the public BOAT-Swin).
        Others as mmdet's ``SwinTransformer``; see ``docs/backbones/boat.md``.
    """
    public_key_rules = _SWIN_RULES
    checkpoint_layouts = _SWIN_LAYOUTS
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=96, depths=[2, 2, 6, 2],
                                            num_heads=[3, 6, 12, 24])),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=96, depths=[2, 2, 18, 2],
                                             num_heads=[3, 6, 12, 24])),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=128, depths=[2, 2, 18, 2],
                                            num_heads=[4, 8, 16, 32])),
    }

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 pretrain_img_size: int = 224, fsla_group_size: Optional[int] = None,
                 fsla_overlap: int = 20, fsla_qk_scale: Optional[float] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 with_cp: bool = False, use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(in_channels, out_indices, frozen_stages, with_cp=with_cp,
                         use_ema=use_ema, init_cfg=init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, _ARCH_KEYS)
        self.num_features = widths = check_pyramid_arch(arch)
        window_size = check_int('window_size', window_size, low=2)
        pretrain_img_size = check_int('pretrain_img_size', pretrain_img_size, low=1)
        check_block_options(mlp_ratio, drop_rate, drop_path_rate, attn_drop_rate)
        make_fsla = fsla_builder(
            window_size**2 if fsla_group_size is None else fsla_group_size, fsla_overlap,
            fsla_qk_scale, qkv_bias, drop_rate)
        self.fsla_stages = tuple(pretrain_img_size // (4 * 2**i) > window_size for i in range(4))

        self.patch_embed = PatchEmbed(None, 4, in_channels, widths[0], norm_layer=nn.LayerNorm,
                                      output_fmt='NHWC', strict_img_size=False,
                                      dynamic_img_pad=True)
        self.embed_drop = nn.Dropout(drop_rate)
        self.stages = nn.ModuleList()
        for i, depth, heads, rates in zip(range(self.num_stages), arch['depths'],
                                          arch['num_heads'],
                                          stage_rates(drop_path_rate, arch['depths'])):
            blocks = [
                BOATSwinBlock(widths[i], heads, window_size, shifted=j % 2 == 1,
                              fsla=make_fsla(widths[i], heads)
                              if j % 2 == 1 and self.fsla_stages[i] else None,
                              mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                              attn_drop=attn_drop_rate, drop_path=rates[j])
                for j in range(depth)
            ]
            downsample = PatchMerging(widths[i], widths[i + 1]) \
                if i < self.num_stages - 1 else None
            self.stages.append(WindowStage(blocks, window_size, downsample, with_cp=with_cp))
        self._add_out_norms(widths)
        self._finish_init()

    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Public BOAT-Swin keys -> this module's.

        ``layers.*`` -> ``stages.*``, ``attnC`` -> ``fsla``, ``get_v`` -> ``lepe``, ``norm4`` ->
        ``fsla_norm``; the final ``norm`` (after stage 3) initialises ``out_norm3``; the
        classifier ``head`` and the resolution-dependent ``attn_mask`` buffers are dropped;
        relative position bias tables of another window size are resized bicubically.
        """
        own = self.state_dict()
        out = {}
        for key, value in super().convert_checkpoint(state_dict).items():
            if key.endswith('relative_position_index') and key in own:
                value = own[key]
            elif (key.endswith('relative_position_bias_table') and key in own
                  and own[key].shape != value.shape):
                value = _resize_bias_table(value, own[key].shape)
            out[key] = value
        return out


# --------------------------------------------------------------------------------------------
# BOAT-CSWin
# --------------------------------------------------------------------------------------------
class CrossShapedWindowAttention(nn.Module):
    """CSWin attention with LePE on (B, H, W, C) maps.

    The channels (and heads) split evenly over the branches; each branch attends inside its own
    windows, given as (height, width) with ``None`` meaning the whole map extent: CSWin's
    vertical ``(None, s)`` and horizontal ``(s, None)`` stripes, or a single ``(None, None)``
    (global) or ``(s, s)`` branch. Maps are zero-padded to whole windows and padded keys are
    masked out (:meth:`key_masks`), so real tokens get the attention on the cropped windows.
    Keys: ``qkv``, ``lepe.{branch}`` (depthwise 3x3 convs), ``proj``.
    """

    def __init__(self, dim: int, num_heads: int,
                 windows: Sequence[Tuple[Optional[int], Optional[int]]], qkv_bias: bool = True,
                 proj_drop: float = 0.):
        super().__init__()
        branch_dim = dim // len(windows)
        self.windows = tuple(windows)
        self.branch_heads = num_heads // len(windows)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.ModuleList(
            nn.Conv2d(branch_dim, branch_dim, 3, padding=1, groups=branch_dim)
            for _ in windows)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_masks(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        """Per branch, for (B, H, W, C) maps like x: the additive (B * windows, 1, 1, L) mask
        of the padded keys in the dtype attention runs in, or None where nothing is padded.

        Every window holds real tokens, so no softmax row is left empty. The masks depend only
        on the map's shape: a stage builds them once for all its blocks.
        """
        b, h, w = x.shape[:3]
        masks: List[Optional[torch.Tensor]] = []
        for window in self.windows:
            padding = window_padding_mask((h, w), window, x.device)
            mask = None
            if padding is not None:
                mask = torch.zeros(padding.shape, dtype=output_dtype(x), device=x.device)
                mask = mask.masked_fill_(padding, float('-inf')).repeat(b, 1)[:, None, None]
            masks.append(mask)
        return tuple(masks)

    def forward(self, x: torch.Tensor,
                key_masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """(B, H, W, C) maps and their :meth:`key_masks` -> (B, H, W, C)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        splits = [t.chunk(len(self.windows), dim=-1) for t in (q, k, v)]
        out = torch.cat([
            self._branch(*qkv, window, lepe, mask)
            for qkv, window, lepe, mask in zip(zip(*splits), self.windows, self.lepe, key_masks)
        ], dim=-1)
        return self.proj_drop(self.proj(out))

    def _branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                window: Tuple[Optional[int], Optional[int]], lepe: nn.Conv2d,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, c) each -> (B, H, W, c): attention + LePE inside the branch's windows."""
        b, h, w, c = q.shape
        q, k, v = (pad_to_multiple(t, window) for t in (q, k, v))
        hp, wp = q.shape[1:3]
        win = window_extent(window, (hp, wp))
        length, heads = win[0] * win[1], self.branch_heads

        # sizes spelled out (no -1): a view that must divide a symbolic size costs dynamo's shape
        # reasoning far more than one it can compare
        windows = b * window_count(window, (hp, wp))

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            t = window_partition(t, window).view(windows, length, heads, c // heads)
            return t.transpose(1, 2)

        # LePE on channels-last windows: no transpose copy, and the conv output is already laid
        # out as (windows, length, heads, head_dim), like SDPA's output
        pos = lepe(window_partition(v, window).view(windows, *win, c).permute(0, 3, 1, 2))
        pos = pos.permute(0, 2, 3, 1).reshape(windows, length, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v),
                                             attn_mask=mask) + pos
        out = window_reverse(out.transpose(1, 2).reshape(windows, length, c), window, hp, wp)
        return crop_end(out, ((1, h), (2, w)))


class CSWinPatchEmbed(nn.Module):
    """CSWin's stem: (B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), C), conv 7x7/4 (padding 2) and
    a LayerNorm. The input is zero-padded at the bottom/right to a multiple of 4 first, so every
    size gives exactly ``ceil(H / 4)`` rows. Keys ``proj``, ``norm``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 7, 4, 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_end(x, ((2, pad_to(h, 4)), (3, pad_to(w, 4))))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvMerge(nn.Module):
    """CSWin's merge: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out), conv 3x3 s2 + LN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class BOATCSWinBlock(_FSLAMixin, nn.Module):
    """CSWin block with optional FSLA after the cross-shaped attention; (B, H, W, C) maps.

    ``x = x + dp(attn(norm1(x)))``, ``x = x + dp(fsla(fsla_norm(x)))`` (FSLA blocks only),
    ``x = x + dp(mlp(norm2(x)))``.
    """

    def __init__(self, dim: int, num_heads: int,
                 windows: Sequence[Tuple[Optional[int], Optional[int]]],
                 fsla: Optional[FeatureSpaceLocalAttention], mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedWindowAttention(dim, num_heads, windows, qkv_bias, drop)
        self._add_fsla(dim, fsla)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor,
                key_masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """(B, H, W, C) maps and the attention's ``key_masks`` of them -> (B, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_masks))
        if self.fsla is not None:
            x = x + self.drop_path(self._fsla_branch(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossShapedStage(Stage):
    """A BOAT-CSWin stage: its blocks share their branch windows, so the padded-key masks of
    the map are built once per stage."""

    def block_args(self, x: torch.Tensor) -> List[Tuple[Tuple[Optional[torch.Tensor], ...]]]:
        return [(self.blocks[0].attn.key_masks(x), )] * len(self.blocks)


@MODELS.register_module()
class BOATCSWin(_BOATBackbone):
    """BOAT-CSWin: CSWin Transformer with feature-space local attention in its even blocks.

    Args:
        arch: ``'tiny'``/``'small'``/``'base'`` (aliases ``'t'``/``'s'``/``'b'``) or a dict
            with ``embed_dims``, ``depths`` (4), ``num_heads`` (4, even in stages 0-2 whose
            heads split over the two stripe branches), ``split_sizes`` (4).
        last_stage_attn: ``'global'`` (default): the last stage attends over its whole map, as
            the public classification model at 224 (7x7 map) and CSWin's official
            dense-prediction backbone; ``'window'``: inside ``split_sizes[3]`` square windows
            (padded, masked). Both have the same parameters and are identical at 224.
        fsla_qk_scale: FSLA attention scale. Default 1.0: the public BOAT-CSWin builds its FSLA
            with ``qk_scale=qkv_bias`` (True), so its checkpoints expect an unscaled q.k; use
            ``None`` for head_dim ** -0.5 when training from scratch.
        fsla_group_size / fsla_overlap: 49 and 20 as in the public code (independent of the
            split sizes).
        Others as mmdet's ``SwinTransformer``; see ``docs/backbones/boat.md``.

    Public checkpoints: ``stage1_conv_embed.{0,2}`` -> ``patch_embed.{proj,norm}``,
    ``stage{s}.{j}`` -> ``stages.{s-1}.blocks.{j}`` (``qkv``/``proj``/``attns.{b}.get_v`` under
    ``attn``), ``merge{s}`` -> ``stages.{s-1}.downsample``, ``content_attn`` -> ``fsla``,
    ``get_v`` -> ``lepe``, ``norm3`` -> ``fsla_norm``; the final ``norm`` initialises
    ``out_norm3``; the classifier ``head`` is dropped.
    """
    public_key_rules = _CSWIN_RULES
    checkpoint_layouts = _CSWIN_LAYOUTS
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=64, depths=[1, 2, 21, 1],
                                            num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=64, depths=[2, 4, 32, 2],
                                             num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=96, depths=[2, 4, 32, 2],
                                            num_heads=[4, 8, 16, 32], split_sizes=[1, 2, 7, 7])),
    }
    LAST_STAGE_ATTN = ('global', 'window')

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, last_stage_attn: str = 'global',
                 fsla_group_size: int = 49, fsla_overlap: int = 20,
                 fsla_qk_scale: Optional[float] = 1.0,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 with_cp: bool = False, use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(in_channels, out_indices, frozen_stages, with_cp=with_cp,
                         use_ema=use_ema, init_cfg=init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, _ARCH_KEYS + ('split_sizes', ))
        self.num_features = widths = check_pyramid_arch(arch, extra_keys=('split_sizes', ))
        for i, heads in enumerate(arch['num_heads'][:3]):
            if heads % 2:
                raise ValueError(f"arch['num_heads'][{i}]={heads} is invalid; allowed values: "
                                 'even ints (the heads split over two stripe branches)')
        check_choice('last_stage_attn', last_stage_attn, self.LAST_STAGE_ATTN)
        check_block_options(mlp_ratio, drop_rate, drop_path_rate)
        make_fsla = fsla_builder(fsla_group_size, fsla_overlap, fsla_qk_scale, qkv_bias,
                                 drop_rate)

        self.patch_embed = CSWinPatchEmbed(in_channels, widths[0])
        self.embed_drop = nn.Dropout(drop_rate)
        self.stages = nn.ModuleList()
        for i, depth, heads, split, rates in zip(
                range(self.num_stages), arch['depths'], arch['num_heads'], arch['split_sizes'],
                stage_rates(drop_path_rate, arch['depths'])):
            if i < 3:
                windows = [(None, split), (split, None)]
            else:
                windows = [(None, None) if last_stage_attn == 'global' else (split, split)]
            blocks = [
                BOATCSWinBlock(widths[i], heads, windows,
                               fsla=make_fsla(widths[i], heads) if j % 2 == 0 else None,
                               mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                               drop_path=rates[j])
                for j in range(depth)
            ]
            downsample = ConvMerge(widths[i], widths[i + 1]) if i < self.num_stages - 1 else None
            self.stages.append(CrossShapedStage(blocks, downsample, with_cp=with_cp))
        self._add_out_norms(widths)
        self._finish_init()
