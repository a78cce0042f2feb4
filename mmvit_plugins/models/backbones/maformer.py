"""MAFormer: a transformer network with Multi-scale Attention Fusion.

Wang et al., "MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual
Recognition", arXiv 2209.01620. No public code exists; this follows the paper, with a
resolution-agnostic GLD for dense prediction (see :class:`GLD` and docs/backbones/maformer.md).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.registry import MODELS
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from torch import nn

from mmvit_plugins.checkpoint import KeyLayout

from ..layers import (
    ScaledDotProductAttention,
    WindowMSA,
    attend_in_windows,
    is_concrete,
    resample_to_grid,
)
from ..layers.resample import RESAMPLE_MODES
from .base import (
    PyramidBackbone,
    Stage,
    WindowStage,
    check_block_options,
    check_choice,
    check_int,
    check_ints,
    check_number,
    check_pyramid_arch,
    is_int,
    resolve_arch,
    stage_rates,
)

FUSIONS = ('parallel', 'sequential')
GLD_RESIZE_MODES = RESAMPLE_MODES


class Attention(nn.Module):
    """Multi-head attention through :class:`ScaledDotProductAttention`.

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
        self.sdpa = ScaledDotProductAttention()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = self.sdpa(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class LocalWindowAttention(nn.Module):
    """The MAF local branch: window self-attention, (B, H, W, C) -> (B, H, W, C).

    Maps are padded to a multiple of the window; ``mask`` (the stage's
    :func:`~mmvit_plugins.models.layers.window.window_attention_mask`) keeps padding and real
    tokens apart, so the result never depends on the padding.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowMSA(dim, num_heads, window_size, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attend_in_windows(self.attn, x, self.window_size, mask=mask)


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
        trunc_normal_(self.pos_embed, std=.02)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H0, W0): torch's antialiased bilinear interpolation or
        adaptive average pooling as matrix products (:func:`resample_to_grid`, which exports
        to ONNX for any size), in float32 for 16-bit inputs, returned in the input's dtype."""
        compute = torch.promote_types(x.dtype, torch.float32)
        return resample_to_grid(x.to(compute), self.grid_size, self.resize_mode).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        h, w = x.shape[2:]
        if not is_concrete(h, w) or (h, w) != self.grid_size:
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
    shifted = False

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
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, shift_size: int = 0,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``shift_size`` is always 0 (MAF windows are never shifted); ``attn_mask`` is the
        stage's window mask."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        local = self.local_attn(y, attn_mask)
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
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path(self.attn(self.norm1(x).reshape(b, h * w, c)).view(b, h, w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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
        with_cp: gradient checkpointing of every block (saves memory, costs a forward).
        use_ema: take ``state_dict_ema`` from a pretrained checkpoint when it has one.
        init_cfg: ``dict(type='Pretrained', checkpoint=path[, prefix=...])`` loads weights and
            reports unmatched keys by name; otherwise truncated-normal init.
    """
    checkpoint_layouts = (KeyLayout('MAFormer', r'^stages\.\d+\.blocks\.\d+\.gld\.',
                                    r'^stages\.(\d+)\.blocks\.(\d+)\.',
                                    'patch_embed.proj.weight'), )
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], _arch(96, (2, 2, 6, 2), (3, 6, 12, 24))),
        **dict.fromkeys(['s', 'small'], _arch(64, (1, 2, 21, 1), (2, 4, 8, 16))),
        **dict.fromkeys(['b', 'base'], _arch(64, (2, 4, 32, 2), (2, 4, 8, 16))),
        **dict.fromkeys(['l', 'large'], _arch(96, (2, 4, 32, 2), (4, 8, 16, 32))),
    }

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
                 with_cp: bool = False,
                 use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(in_channels, out_indices, frozen_stages, with_cp=with_cp,
                         use_ema=use_ema, init_cfg=init_cfg)
        arch = resolve_arch(arch, self.arch_zoo, ('embed_dims', 'depths', 'num_heads'))
        self.num_features = widths = check_pyramid_arch(arch)
        self.pretrain_img_size = self._check_size(pretrain_img_size)
        window_size = check_int('window_size', window_size, low=1)
        check_number('gld_ratio', gld_ratio, 0., 1., include_low=False)
        check_choice('gld_resize_mode', gld_resize_mode, GLD_RESIZE_MODES)
        check_choice('fusion', fusion, FUSIONS)
        check_block_options(mlp_ratio, drop_rate, drop_path_rate, attn_drop_rate)

        self.patch_embed = PatchEmbed(None, 4, in_channels, widths[0], norm_layer=nn.LayerNorm,
                                      output_fmt='NHWC', strict_img_size=False,
                                      dynamic_img_pad=True)
        self.embed_drop = nn.Dropout(drop_rate)
        grid = tuple(math.ceil(s / 4) for s in self.pretrain_img_size)
        self.stages = nn.ModuleList()
        for i, dim, heads, rates in zip(range(self.num_stages), widths, arch['num_heads'],
                                        stage_rates(drop_path_rate, arch['depths'])):
            common = dict(dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          drop=drop_rate, attn_drop=attn_drop_rate)
            downsample = PatchMerging(widths[i - 1], dim) if i > 0 else None
            if i < 2:
                blocks = [MAFBlock(window_size=window_size, grid_size=grid, gld_ratio=gld_ratio,
                                   gld_resize_mode=gld_resize_mode, fusion=fusion,
                                   drop_path=rate, **common) for rate in rates]
                stage = WindowStage(blocks, window_size, downsample, downsample_first=True,
                                    with_cp=with_cp)
            else:
                blocks = [ViTBlock(drop_path=rate, **common) for rate in rates]
                stage = Stage(blocks, downsample, downsample_first=True, with_cp=with_cp)
            self.stages.append(stage)
            grid = tuple(math.ceil(s / 2) for s in grid)
        self._add_out_norms(widths)
        self._finish_init()

    @staticmethod
    def _check_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
        """An int or an (H, W) pair of positive ints."""
        return check_ints('pretrain_img_size', (size, size) if is_int(size) else size, 2)
