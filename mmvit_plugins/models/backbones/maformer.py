"""MAFormer: a transformer network with Multi-scale Attention Fusion.

Wang et al., "MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual
Recognition", arXiv 2209.01620. No public code exists; this follows the paper, with a
resolution-agnostic GLD for dense prediction (see :class:`GLD` and docs/backbones/maformer.md).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks.drop import DropPath
from mmengine.registry import MODELS
from torch import nn

from ..layers import (
    Mlp,
    PatchMerging,
    WindowMSA,
    nhwc_to_nchw,
    pad_to_multiple,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from .base import (
    PyramidBackbone,
    check_heads,
    check_input,
    check_out_indices,
    check_range,
    drop_path_rates,
    resolve_arch,
)

FUSIONS = ('parallel', 'sequential')
GLD_RESIZE_MODES = ('bilinear', 'area')


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    ``forward(x (B, L, C), context (B, M, C) or None) -> (B, L, C)``: queries from ``x``, keys and
    values from ``context`` (cross-attention, the MAF fusion) or from ``x`` (self-attention).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class LocalWindowAttention(nn.Module):
    """The MAF local branch: window self-attention, (B, H, W, C) -> (B, H, W, C).

    Maps are padded to a multiple of the window; the padded tokens are masked out as keys, so the
    result never depends on the padding.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowMSA(dim, num_heads, window_size, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop)

    def padding_mask(self, h: int, w: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(num_windows, n, n) additive mask, -inf on padded keys, for an (h, w) map; None when
        the map needs no padding."""
        padding = window_padding_mask((h, w), self.window_size, x.device)
        if padding is None:
            return None
        mask = torch.zeros(padding.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(padding, float('-inf'))
        return mask[:, None, :].expand(-1, padding.shape[1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = pad_to_multiple(x, self.window_size)
        hp, wp = x.shape[1:3]
        mask = self.padding_mask(h, w, x)
        windows = self.attn(window_partition(x, self.window_size), mask)
        return window_reverse(windows, self.window_size, hp, wp)[:, :h, :w]


class GLD(nn.Module):
    """Global Learning with Down-sampling, for any input size: (B, H, W, C) -> (B, M, C).

    The paper's GLD is one fully connected layer over the token axis, mapping the L tokens of the
    pretraining grid (H0, W0) to M = round(ratio * L) global tokens, plus a position embedding of
    the M tokens. A map of another size is first resampled to (H0, W0) (``resize_mode``:
    antialiased ``'bilinear'`` or ``'area'`` averaging), so the weights, the parameter count and
    M never depend on the input size, and at (H0, W0) the layer is exactly the paper's.
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int], ratio: float = 0.5,
                 resize_mode: str = 'bilinear'):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.resize_mode = resize_mode
        num_tokens = grid_size[0] * grid_size[1]
        self.num_global_tokens = max(1, round(ratio * num_tokens))
        self.token_fc = nn.Linear(num_tokens, self.num_global_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_global_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=.02)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H0, W0)."""
        if self.resize_mode == 'area':
            return F.adaptive_avg_pool2d(x, self.grid_size)
        return F.interpolate(x, size=self.grid_size, mode='bilinear', align_corners=False,
                             antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[2:]) != self.grid_size:
            x = self.resample(x)
        x = self.token_fc(x.flatten(2))
        return x.transpose(1, 2) + self.pos_embed


class MAFBlock(nn.Module):
    """Multi-scale Attention Fusion block, (B, H, W, C) -> (B, H, W, C).

    ``x + fuse(local(norm(x)), GLD(.))`` then ``x + MLP(norm(x))``; the fusion is cross-attention
    with queries from the local stream and keys/values from the global stream. ``fusion``:
    ``'parallel'`` (the paper's MAF: GLD reads the block input) or ``'sequential'`` (the paper's
    ablation: GLD reads the local branch's output).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, grid_size: Tuple[int, int],
                 gld_ratio: float = 0.5, gld_resize_mode: str = 'bilinear',
                 fusion: str = 'parallel', mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.fusion = fusion
        self.norm1 = nn.LayerNorm(dim)
        self.local_attn = LocalWindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias,
                                               attn_drop=attn_drop, proj_drop=drop)
        self.gld = GLD(dim, grid_size, gld_ratio, gld_resize_mode)
        self.fusion_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                     proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        local = self.local_attn(y)
        global_tokens = self.gld(local if self.fusion == 'sequential' else y)
        fused = self.fusion_attn(local.reshape(b, h * w, c), global_tokens)
        x = x + self.drop_path(fused.view(b, h, w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTBlock(nn.Module):
    """Plain pre-norm ViT block with global self-attention, (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path(self.attn(self.norm1(x).reshape(b, h * w, c)).view(b, h, w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), C): 4x4 patches (zero-padded at the
    bottom/right), linear projection, LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = F.pad(x, (0, -w % self.patch_size, 0, -h % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class MAFormerStage(nn.Module):
    """Optional patch merging, then blocks: (B, H, W, C_in) -> (B, H', W', C)."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module] = None,
                 with_cp: bool = False):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _arch(embed_dims: int, depths: Sequence[int], num_heads: Sequence[int]) -> dict:
    return dict(embed_dims=embed_dims, depths=tuple(depths), num_heads=tuple(num_heads))


@MODELS.register_module()
class MAFormer(PyramidBackbone):
    """MAFormer backbone (arXiv 2209.01620) for MMDetection and MMSegmentation.

    Stage widths (C, 2C, 4C, 8C) at strides (4, 8, 16, 32). Stages 1-2 hold MAF blocks (window
    attention + GLD + fusion attention), stages 3-4 plain global-attention ViT blocks.

    Presets (``arch``). The paper compares MAFormer with CSWin at similar parameter counts
    (MAFormer-L against CSWin-B). The widths and depths below are **chosen**, not the paper's:
    each size copies the widths, depths and heads of a CSWin model (Dong et al. 2022): L of
    CSWin-B as the paper pairs them, S of CSWin-T and B of CSWin-S (assumed pairing), so that
    the comparison is at an equal layout. ``'tiny'`` is not a paper size: it copies Swin-T, so
    that benchmarks against Swin-T compare the attention designs at an equal layout.

    ======  =====================  ==========  ==============  ==========================
    arch    paper name             embed_dims  depths          num_heads
    ======  =====================  ==========  ==============  ==========================
    tiny    none (Swin-T layout)   96          (2, 2, 6, 2)    (3, 6, 12, 24)
    small   MAFormer-S (~CSWin-T)  64          (1, 2, 21, 1)   (2, 4, 8, 16)
    base    MAFormer-B (~CSWin-S)  64          (2, 4, 32, 2)   (2, 4, 8, 16)
    large   MAFormer-L (~CSWin-B)  96          (2, 4, 32, 2)   (4, 8, 16, 32)
    ======  =====================  ==========  ==============  ==========================

    Args:
        arch: a preset name (``'tiny'``, ``'small'``, ``'base'``, ``'large'``, or ``t/s/b/l``) or
            a dict with ``embed_dims`` (int C), ``depths`` (4 ints) and ``num_heads`` (4 ints).
        in_channels: image channels.
        pretrain_img_size: the image size (int or (H, W)) the GLD layers are built for; their
            token FC has (H0*W0) inputs with (H0, W0) = the stage's grid at this size (56x56 and
            28x28 at 224). From the paper (ImageNet at 224).
        window_size: local-branch window. Chosen: 7, as Swin/CSWin at 224 (divides 56 and 28);
            the paper does not state it.
        mlp_ratio: MLP hidden width / C. 4, as CSWin (chosen; not stated in the paper).
        qkv_bias: bias of the query/key/value projections (chosen: True, as Swin/CSWin).
        gld_ratio: GLD down-sampling ratio N (global tokens = N * L0). From the paper: 0.5, its
            best value; its ablation varies it, so any value in (0, 1] is accepted.
        gld_resize_mode: how GLD resamples maps of other sizes to the pretraining grid:
            ``'bilinear'`` (antialiased, chosen default) or ``'area'`` (adaptive average pooling).
            Not in the paper (its GLD works only at the pretraining grid).
        fusion: ``'parallel'`` (the paper's MAF, default) or ``'sequential'`` (its ablation,
            global branch after the local one).
        drop_rate: dropout after projections and in the MLPs.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        out_indices: stages whose outputs are returned, each after its own norm ``out_norm{i}``.
        frozen_stages: -1 freezes nothing; 0 the patch embedding; i > 0 also stages 1..i (with
            their patch merging) and their output norms.
        norm_eval: keep BatchNorm layers in eval mode while training.
        with_cp: gradient checkpointing of every block (saves memory, costs a forward).
        use_ema: take ``state_dict_ema`` from a pretrained checkpoint when it has one.
        init_cfg: ``dict(type='Pretrained', checkpoint=path[, prefix=...])`` loads weights and
            reports unmatched keys by name; otherwise truncated-normal init.
    """
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], _arch(96, (2, 2, 6, 2), (3, 6, 12, 24))),
        **dict.fromkeys(['s', 'small'], _arch(64, (1, 2, 21, 1), (2, 4, 8, 16))),
        **dict.fromkeys(['b', 'base'], _arch(64, (2, 4, 32, 2), (2, 4, 8, 16))),
        **dict.fromkeys(['l', 'large'], _arch(96, (2, 4, 32, 2), (4, 8, 16, 32))),
    }
    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 pretrain_img_size: Union[int, Tuple[int, int]] = 224,
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 gld_ratio: float = 0.5,
                 gld_resize_mode: str = 'bilinear',
                 fusion: str = 'parallel',
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(frozen_stages=frozen_stages, norm_eval=norm_eval, use_ema=use_ema,
                         init_cfg=init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, ('embed_dims', 'depths', 'num_heads'))
        embed_dims, depths, num_heads = self._check_arch(arch)
        self.pretrain_img_size = self._check_size(pretrain_img_size)
        self._check_args(in_channels, window_size, mlp_ratio, gld_ratio, gld_resize_mode, fusion,
                         drop_rate, attn_drop_rate, drop_path_rate, frozen_stages)
        self.in_channels = in_channels
        self.out_indices = check_out_indices(out_indices, self.num_stages)
        self.num_features = [embed_dims * 2**i for i in range(self.num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dims)
        self.drop_after_embed = nn.Dropout(drop_rate)
        total = sum(depths)
        drop_paths = drop_path_rates(drop_path_rate, total)
        grid = tuple(math.ceil(s / 4) for s in self.pretrain_img_size)
        self.stages = nn.ModuleList()
        for i, (depth, dim, heads) in enumerate(zip(depths, self.num_features, num_heads)):
            rates, drop_paths = drop_paths[:depth], drop_paths[depth:]
            common = dict(dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          drop=drop_rate, attn_drop=attn_drop_rate)
            if i < 2:
                blocks = [MAFBlock(window_size=window_size, grid_size=grid, gld_ratio=gld_ratio,
                                   gld_resize_mode=gld_resize_mode, fusion=fusion, drop_path=rate,
                                   **common) for rate in rates]
            else:
                blocks = [ViTBlock(drop_path=rate, **common) for rate in rates]
            downsample = PatchMerging(self.num_features[i - 1], dim) if i > 0 else None
            self.stages.append(MAFormerStage(blocks, downsample, with_cp))
            grid = tuple(math.ceil(s / 2) for s in grid)
        for i in self.out_indices:
            self.add_module(f'out_norm{i}', nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_module)
        self._freeze_stages()

    # -- arguments -----------------------------------------------------------------------------
    @staticmethod
    def _check_arch(arch: dict) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
        embed_dims, depths, num_heads = arch['embed_dims'], arch['depths'], arch['num_heads']
        if not isinstance(embed_dims, int) or embed_dims <= 0:
            raise ValueError(f'arch embed_dims={embed_dims!r} is invalid; allowed values: '
                             'positive ints')
        for name, value in (('depths', depths), ('num_heads', num_heads)):
            if (not isinstance(value, Sequence) or len(value) != 4
                    or not all(isinstance(v, int) and v > 0 for v in value)):
                raise ValueError(f'arch {name}={value!r} is invalid; allowed values: 4 positive '
                                 'ints, one per stage')
        check_heads([embed_dims * 2**i for i in range(4)], num_heads)
        return embed_dims, tuple(depths), tuple(num_heads)

    @staticmethod
    def _check_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f'pretrain_img_size={size!r} is invalid; allowed values: a positive '
                             'int or a pair (H, W) of positive ints')
        return size

    @staticmethod
    def _check_args(in_channels: int, window_size: int, mlp_ratio: float, gld_ratio: float,
                    gld_resize_mode: str, fusion: str, drop_rate: float, attn_drop_rate: float,
                    drop_path_rate: float, frozen_stages: int) -> None:
        for name, value in (('in_channels', in_channels), ('window_size', window_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'{name}={value!r} is invalid; allowed values: positive ints')
        if mlp_ratio <= 0:
            raise ValueError(f'mlp_ratio={mlp_ratio} is invalid; allowed values: > 0')
        if not 0 < gld_ratio <= 1:
            raise ValueError(f'gld_ratio={gld_ratio} is invalid; allowed values: (0, 1]')
        if gld_resize_mode not in GLD_RESIZE_MODES:
            raise ValueError(f'gld_resize_mode={gld_resize_mode!r} is invalid; allowed values: '
                             f'{GLD_RESIZE_MODES}')
        if fusion not in FUSIONS:
            raise ValueError(f'fusion={fusion!r} is invalid; allowed values: {FUSIONS}')
        check_range('drop_rate', drop_rate, 0., 1.)
        check_range('attn_drop_rate', attn_drop_rate, 0., 1.)
        check_range('drop_path_rate', drop_path_rate, 0., 1.)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages={frozen_stages!r} is invalid; allowed values: '
                             'ints in [-1, 4]')

    # -- weights -------------------------------------------------------------------------------
    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        modules: List[nn.Module] = [self.patch_embed]
        for i in range(min(frozen_stages, self.num_stages)):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'out_norm{i}'))
        return modules

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> one (B, num_features[i], ceil(H / 2**(i+2)), ...) map per
        entry of ``out_indices``."""
        check_input(x, self.in_channels)
        x = self.drop_after_embed(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(nhwc_to_nchw(getattr(self, f'out_norm{i}')(x)))
        return tuple(outs)
