"""BOAT backbones: BOAT-Swin and BOAT-CSWin (Yu et al., "BOAT: Bilateral Local Attention Vision
Transformer", arXiv 2201.13027), for dense prediction at any input size.

Each block runs an image-space local attention (Swin windows or CSWin stripes), then the
feature-space local attention (FSLA) of :mod:`mmvit_plugins.models.layers.fsla`, then an MLP.
Public checkpoints (github.com/mahaoyuHKU/pytorch-boat) load through ``convert_checkpoint``.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.registry import MODELS
from torch import nn

from ..layers import (
    Mlp,
    PatchMerging,
    WindowMSA,
    masked_attention,
    pad_to_multiple,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from ..layers.fsla import FeatureSpaceLocalAttention
from .base import (
    PyramidBackbone,
    check_heads,
    check_input,
    check_out_indices,
    check_range,
    drop_path_rates,
    resolve_arch,
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


def _init_weights(module: nn.Module) -> None:
    """Initialisation of the public models: truncated normal Linear, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_arch(arch: dict, extra: Sequence[str] = ()) -> Tuple[int, List[int]]:
    """Validate a resolved arch; returns (embed_dims, the 4 stage widths)."""
    for key in ('depths', 'num_heads') + tuple(extra):
        if len(arch[key]) != 4 or not all(isinstance(v, int) and v > 0 for v in arch[key]):
            raise ValueError(f'arch[{key!r}]={arch[key]} is invalid; allowed values: '
                             '4 positive ints, one per stage')
    embed_dims = arch['embed_dims']
    if not isinstance(embed_dims, int) or embed_dims <= 0:
        raise ValueError(f"arch['embed_dims']={embed_dims} is invalid; allowed values: "
                         'positive ints')
    widths = [embed_dims * 2**i for i in range(4)]
    check_heads(widths, arch['num_heads'])
    return embed_dims, widths


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, ceil(H/s), ceil(W/s), C) by a strided conv and a LayerNorm.

    The input is zero-padded at the bottom/right to a multiple of the stride first, so every
    size gives exactly ``ceil(H / stride)`` rows (and inputs of a single pixel work).
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int,
                 padding: int = 0):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.stride, 0, -h % self.stride))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvMerge(nn.Module):
    """CSWin's merge: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out), conv 3x3 s2 + LN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class _FSLAMixin:
    """The FSLA branch of a block: ``x + fsla(fsla_norm(x))`` on (B, H, W, C) maps."""
    fsla: Optional[FeatureSpaceLocalAttention]
    fsla_norm: Optional[nn.LayerNorm]

    def _build_fsla(self, enabled: bool, dim: int, num_heads: int, qkv_bias: bool,
                    fsla_cfg: dict, proj_drop: float) -> None:
        self.fsla_norm = nn.LayerNorm(dim) if enabled else None
        self.fsla = FeatureSpaceLocalAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
            **fsla_cfg) if enabled else None

    def _fsla_branch(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return self.fsla(self.fsla_norm(x).reshape(b, h * w, c), (h, w)).view(b, h, w, c)


# --------------------------------------------------------------------------------------------
# BOAT-Swin
# --------------------------------------------------------------------------------------------
def swin_attention_mask(padded_hw: Tuple[int, int], hw: Tuple[int, int], window_size: int,
                        shift_size: int, device: torch.device) -> Optional[torch.Tensor]:
    """Additive (num_windows, ws*ws, ws*ws) mask for a padded map.

    Tokens of different shifted-window regions never attend to each other (-100, as in Swin and
    the public checkpoints), nor do padding and real tokens (-inf: every token still sees
    itself). The map is the (hp, wp) padded one, rolled by ``-shift_size``; None when nothing
    is masked.
    """
    (hp, wp), (h, w) = padded_hw, hw
    if not shift_size and (hp, wp) == (h, w):
        return None
    region = torch.zeros(hp, wp, device=device)
    if shift_size:
        slices = (slice(0, -window_size), slice(-window_size, -shift_size),
                  slice(-shift_size, None))
        for i, rows in enumerate(slices):
            for j, cols in enumerate(slices):
                region[rows, cols] = 3 * i + j
    padding = torch.ones(hp, wp, dtype=torch.bool, device=device)
    padding[:h, :w] = False
    padding = torch.roll(padding, (-shift_size, -shift_size), (0, 1))
    region = region.masked_fill(padding, -1).view(1, hp, wp, 1)
    region = window_partition(region, window_size).squeeze(-1)
    mask = (region[:, None, :] != region[:, :, None]).float() * -100.
    # Not -100 here: a padded query would then output e^-100-weighted real values, subnormal
    # floats that make every later matmul over the padded windows 10-50x slower on CPU.
    is_padding = region < 0
    return mask.masked_fill(is_padding[:, None, :] != is_padding[:, :, None], float('-inf'))


class BOATSwinBlock(_FSLAMixin, nn.Module):
    """Swin block (shifted or not) with FSLA after the window attention; (B, H, W, C) maps.

    As in the public code: ``x = x + dp(wmsa(norm1(x)))``, then ``x = x + fsla(fsla_norm(x))``
    (no drop-path), then ``x = x + dp(mlp(norm2(x)))``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool,
                 with_fsla: bool, fsla_cfg: dict, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowMSA(dim, num_heads, window_size, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=drop)
        self._build_fsla(with_fsla, dim, num_heads, qkv_bias, fsla_cfg, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, shift_size: int,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[1:3]
        ws = self.window_size
        y = pad_to_multiple(self.norm1(x), ws)
        hp, wp = y.shape[1:3]
        if shift_size:
            y = torch.roll(y, (-shift_size, -shift_size), (1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask=attn_mask), ws, hp, wp)
        if shift_size:
            y = torch.roll(y, (shift_size, shift_size), (1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        if self.fsla is not None:
            x = x + self._fsla_branch(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _Stage(nn.Module):
    """Blocks of one stage and the downsampling after it (None for the last stage)."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module],
                 with_cp: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.with_cp = with_cp

    def _run(self, block: Callable, x: torch.Tensor, *args) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def block_args(self, x: torch.Tensor) -> List[tuple]:
        """Extra forward arguments of each block for the stage input ``x``."""
        return [()] * len(self.blocks)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), downsampled input of the next stage)."""
        for block, args in zip(self.blocks, self.block_args(x)):
            x = self._run(block, x, *args)
        return x, (x if self.downsample is None else self.downsample(x))


class BOATSwinStage(_Stage):
    """Swin stage: odd blocks are shifted when the map is larger than one window."""

    def block_args(self, x: torch.Tensor) -> List[tuple]:
        """(shift size, attention mask) of every block."""
        h, w = x.shape[1:3]
        ws = self.blocks[0].window_size
        padded = (-(-h // ws) * ws, -(-w // ws) * ws)
        shift = ws // 2 if max(h, w) > ws else 0
        args = {False: (0, swin_attention_mask(padded, (h, w), ws, 0, x.device))}
        if any(block.shifted for block in self.blocks):
            args[True] = (shift, swin_attention_mask(padded, (h, w), ws, shift, x.device))
        return [args[block.shifted] for block in self.blocks]


class _BOATBackbone(PyramidBackbone):
    """What BOAT-Swin and BOAT-CSWin share: patch embedding, four stages, per-output norms."""

    def _add_out_norms(self, widths: Sequence[int]) -> None:
        for i in self.out_indices:
            self.add_module(f'out_norm{i}', nn.LayerNorm(widths[i]))
        self.apply(_init_weights)
        self._freeze_stages()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> NCHW maps of strides 4 * 2**i, one per ``out_indices``."""
        check_input(x, self.in_channels)
        x = self.drop_after_pos(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'out_norm{i}')(out).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)

    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """As mmdet's Swin: the stem, then stage i (with its downsampling) and its output norm."""
        modules = [self.patch_embed] if frozen_stages >= 0 else []
        for i in range(frozen_stages):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'out_norm{i}'))
        return modules


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
                 norm_eval: bool = False, with_cp: bool = False, use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(frozen_stages, norm_eval, use_ema, init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, _ARCH_KEYS)
        embed_dims, widths = _check_arch(arch)
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f'window_size={window_size} is invalid; allowed values: ints >= 2')
        if not isinstance(pretrain_img_size, int) or pretrain_img_size <= 0:
            raise ValueError(f'pretrain_img_size={pretrain_img_size} is invalid; allowed '
                             'values: positive ints')
        check_range('drop_path_rate', drop_path_rate, 0., 1.)
        check_range('frozen_stages', frozen_stages, -1, 4)
        self.out_indices = check_out_indices(out_indices, 4)
        self.in_channels = in_channels
        self.num_features = widths
        fsla_cfg = dict(group_size=fsla_group_size or window_size**2, overlap=fsla_overlap,
                        qk_scale=fsla_qk_scale)
        self.fsla_stages = tuple(pretrain_img_size // (4 * 2**i) > window_size for i in range(4))

        self.patch_embed = PatchEmbed(in_channels, embed_dims, 4, 4)
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(arch['depths']))
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(arch['depths'], arch['num_heads'])):
            rates, dpr = dpr[:depth], dpr[depth:]
            blocks = [
                BOATSwinBlock(widths[i], heads, window_size, shifted=j % 2 == 1,
                              with_fsla=j % 2 == 1 and self.fsla_stages[i], fsla_cfg=fsla_cfg,
                              mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                              attn_drop=attn_drop_rate, drop_path=rates[j])
                for j in range(depth)
            ]
            downsample = PatchMerging(widths[i], widths[i + 1]) if i < 3 else None
            self.stages.append(BOATSwinStage(blocks, downsample, with_cp))
        self._add_out_norms(widths)

    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Public BOAT-Swin keys -> this module's.

        ``layers.*`` -> ``stages.*``, ``attnC`` -> ``fsla``, ``get_v`` -> ``lepe``, ``norm4`` ->
        ``fsla_norm``; the final ``norm`` (after stage 3) initialises ``out_norm3``; the
        classifier ``head`` and the resolution-dependent ``attn_mask`` buffers are dropped;
        relative position bias tables of another window size are resized bicubically.
        """
        own = self.state_dict()
        out = {}
        for key, value in _rename(state_dict, self.public_key_rules).items():
            if key.endswith('relative_position_index') and key in own:
                value = own[key]
            elif (key.endswith('relative_position_bias_table') and key in own
                  and own[key].shape != value.shape):
                value = _resize_bias_table(value, own[key].shape)
            out[key] = value
        return out


def _rename(state_dict: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
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
    """((2w-1)**2, heads) -> ((2w'-1)**2, heads), bicubic over the relative offsets."""
    src, dst = round(table.shape[0]**0.5), round(shape[0]**0.5)
    grid = table.t().reshape(1, -1, src, src).float()
    grid = F.interpolate(grid, size=(dst, dst), mode='bicubic', align_corners=False)
    return grid.reshape(-1, dst * dst).t().to(table.dtype)


# --------------------------------------------------------------------------------------------
# BOAT-CSWin
# --------------------------------------------------------------------------------------------
class CrossShapedWindowAttention(nn.Module):
    """CSWin attention with LePE on (B, H, W, C) maps.

    The channels (and heads) split evenly over the branches; each branch attends inside its own
    windows, given as (height, width) with ``None`` meaning the whole map extent: CSWin's
    vertical ``(None, s)`` and horizontal ``(s, None)`` stripes, or a single ``(None, None)``
    (global) or ``(s, s)`` branch. Maps are zero-padded to whole windows; padded keys are masked
    out and padded values are zero, so the result equals attention on the cropped windows.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        splits = [t.chunk(len(self.windows), dim=-1) for t in (q, k, v)]
        out = torch.cat([
            self._branch(*qkv, window, lepe)
            for qkv, window, lepe in zip(zip(*splits), self.windows, self.lepe)
        ], dim=-1)
        return self.proj_drop(self.proj(out))

    def _branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                window: Tuple[Optional[int], Optional[int]], lepe: nn.Conv2d) -> torch.Tensor:
        """(B, H, W, c) each -> (B, H, W, c): attention + LePE inside the branch's windows."""
        b, h, w, c = q.shape
        win = (window[0] or h, window[1] or w)
        q, k, v = (pad_to_multiple(t, win) for t in (q, k, v))
        hp, wp = q.shape[1:3]
        length, heads = win[0] * win[1], self.branch_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return window_partition(t, win).view(-1, length, heads, c // heads).transpose(1, 2)

        # LePE on channels-last windows: no transpose copy, and the conv output is already laid
        # out as (windows, length, heads, head_dim), like SDPA's output
        pos = lepe(window_partition(v, win).view(-1, *win, c).permute(0, 3, 1, 2))
        pos = pos.permute(0, 2, 3, 1).reshape(-1, length, heads, c // heads).transpose(1, 2)
        key_padding = window_padding_mask((h, w), win, q.device)
        if key_padding is not None:
            key_padding = key_padding.view(-1, 1, 1, length).repeat(b, 1, 1, 1)
        out = masked_attention(split_heads(q), split_heads(k), split_heads(v),
                               key_padding_mask=key_padding) + pos
        out = window_reverse(out.transpose(1, 2).reshape(-1, length, c), win, hp, wp)
        return out[:, :h, :w]


class BOATCSWinBlock(_FSLAMixin, nn.Module):
    """CSWin block with FSLA after the cross-shaped attention; (B, H, W, C) maps.

    ``x = x + dp(attn(norm1(x)))``, ``x = x + dp(fsla(fsla_norm(x)))`` (FSLA blocks only),
    ``x = x + dp(mlp(norm2(x)))``.
    """

    def __init__(self, dim: int, num_heads: int,
                 windows: Sequence[Tuple[Optional[int], Optional[int]]], with_fsla: bool,
                 fsla_cfg: dict, mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedWindowAttention(dim, num_heads, windows, qkv_bias, drop)
        self._build_fsla(with_fsla, dim, num_heads, qkv_bias, fsla_cfg, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.fsla is not None:
            x = x + self.drop_path(self._fsla_branch(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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
    """
    public_key_rules = _CSWIN_RULES
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=64, depths=[1, 2, 21, 1],
                                            num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=64, depths=[2, 4, 32, 2],
                                             num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=96, depths=[2, 4, 32, 2],
                                            num_heads=[4, 8, 16, 32], split_sizes=[1, 2, 7, 7])),
    }
    _last_stage_attn = ('global', 'window')

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, last_stage_attn: str = 'global',
                 fsla_group_size: int = 49, fsla_overlap: int = 20,
                 fsla_qk_scale: Optional[float] = 1.0,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(frozen_stages, norm_eval, use_ema, init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, _ARCH_KEYS + ('split_sizes', ))
        embed_dims, widths = _check_arch(arch, extra=('split_sizes', ))
        for i, heads in enumerate(arch['num_heads'][:3]):
            if heads % 2:
                raise ValueError(f"arch['num_heads'][{i}]={heads} is invalid; allowed values: "
                                 'even ints (the heads split over two stripe branches)')
        if last_stage_attn not in self._last_stage_attn:
            raise ValueError(f'last_stage_attn={last_stage_attn!r} is invalid; allowed '
                             f'values: {self._last_stage_attn}')
        check_range('drop_path_rate', drop_path_rate, 0., 1.)
        check_range('frozen_stages', frozen_stages, -1, 4)
        self.out_indices = check_out_indices(out_indices, 4)
        self.in_channels = in_channels
        self.num_features = widths
        fsla_cfg = dict(group_size=fsla_group_size, overlap=fsla_overlap,
                        qk_scale=fsla_qk_scale)

        self.patch_embed = PatchEmbed(in_channels, embed_dims, 7, 4, 2)
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(arch['depths']))
        self.stages = nn.ModuleList()
        for i, (depth, heads, split) in enumerate(
                zip(arch['depths'], arch['num_heads'], arch['split_sizes'])):
            rates, dpr = dpr[:depth], dpr[depth:]
            if i < 3:
                windows = [(None, split), (split, None)]
            else:
                windows = [(None, None) if last_stage_attn == 'global' else (split, split)]
            blocks = [
                BOATCSWinBlock(widths[i], heads, windows, with_fsla=j % 2 == 0,
                               fsla_cfg=fsla_cfg, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                               drop=drop_rate, drop_path=rates[j])
                for j in range(depth)
            ]
            downsample = ConvMerge(widths[i], widths[i + 1]) if i < 3 else None
            self.stages.append(_Stage(blocks, downsample, with_cp))
        self._add_out_norms(widths)

    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Public BOAT-CSWin keys -> this module's.

        ``stage1_conv_embed.{0,2}`` -> ``patch_embed.{proj,norm}``, ``stage{s}.{j}`` ->
        ``stages.{s-1}.blocks.{j}`` (``qkv``/``proj``/``attns.{b}.get_v`` under ``attn``),
        ``merge{s}`` -> ``stages.{s-1}.downsample``, ``content_attn`` -> ``fsla``, ``get_v``
        -> ``lepe``, ``norm3`` -> ``fsla_norm``; the final ``norm`` initialises ``out_norm3``;
        the classifier ``head`` is dropped.
        """
        return _rename(state_dict, self.public_key_rules)
