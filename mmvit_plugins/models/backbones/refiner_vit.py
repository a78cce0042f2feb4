"""Refiner-ViT (Zhou et al., "Refiner: Refining Self-attention for Vision Transformers",
arXiv 2106.03714) as a detection/segmentation backbone.

The trunk is the public model: a CNN patch stem (stride 16), then blocks that alternate between
computing attention and sharing the previous block's attention map through the refiner (DLA).
For dense prediction most blocks attend within windows (the refiner then runs on each window's
map) and a few globally, and a simple feature pyramid turns the stride-16 tokens into strides
4/8/16/32.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.registry import MODELS
from timm.layers import DropPath, LayerNorm2d, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.nn import functional as F

from mmvit_plugins.checkpoint import KeyLayout
from mmvit_plugins.models.layers import (
    SimpleFeaturePyramid,
    ceil_div,
    contains,
    crop_end,
    pad_end,
    pad_to,
    pad_to_multiple,
    resize_abs_pos_embed,
    window_padding_mask,
    window_partition,
    window_reverse,
)
from mmvit_plugins.models.layers.policy import autocast_off, channels_last_on, tracing
from mmvit_plugins.models.layers.pyramid import PYRAMID_STRIDES
from mmvit_plugins.models.layers.refiner import DistributedLocalAttention, resolve_refiner_impl

from .base import (
    PyramidBackbone,
    check_heads,
    check_indices,
    check_int,
    check_number,
    check_probability,
    checkpoint,
    drop_path_rates,
    output_dtype,
    resolve_arch,
)

PATCH_SIZE = 16
# Every public block scales its input by this before the norms and divides the branches by it.
ADJUST_RATIO = 0.5
_CLASSIFIER_KEYS = ('head.', 'aux_head.', 'norm.')


class RefinedAttention(nn.Module):
    """Attention of a computing or a sharing Refiner block, global or windowed.

    Computing (``share=False``): ``a = softmax(q k^T * scale)``, plus ``scale * prev`` when a
    previous map is given; ``a`` is used and passed on. Sharing (``share=True``): only values are
    projected, ``a = adapt_bn(dla(prev)) * scale`` is used and ``prev`` is passed on unchanged.

    ``window_size=0``: global attention over (B, N, C) tokens (class token allowed), maps
    (B, heads, N, N). Otherwise the tokens are the (h, w) grid, padded to the window (padding
    masked out as keys and zeroed in the maps), maps (B * num_windows, heads, ws^2, ws^2).
    Forward hooks on ``attn_map`` see the map applied to the values (for a sharing block, what
    leaves the refiner); the forward's ``prev`` is what enters it.
    """

    def __init__(self, dim: int, num_heads: int, share: bool, window_size: int,
                 qkv_bias: bool = True, dla_expansion: int = 3, dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None):
        super().__init__()
        self.num_heads = num_heads
        self.share = share
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        if share:
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
            self.dla = DistributedLocalAttention(num_heads, dla_expansion, dla_kernel_size,
                                                 refiner_impl)
            self.adapt_bn = nn.BatchNorm2d(num_heads)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # the map applied to the values passes through it: where forward hooks see it
        self.attn_map = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens, the previous map, the grid (h, w) -> (B, N, C), the map passed on."""
        if not self.window_size:
            out, attn = self._attend(x, prev, None)
            return self.proj(out), attn
        b, n, c = x.shape
        h, w = hw
        x = pad_to_multiple(x.view(b, h, w, c), self.window_size)
        hp, wp = x.shape[1:3]
        padding = window_padding_mask(hw, self.window_size, x.device)
        valid = None if padding is None else (~padding).repeat(b, 1)
        out, attn = self._attend(window_partition(x, self.window_size), prev, valid,
                                 (hw, self.window_size))
        out = crop_end(window_reverse(out, self.window_size, hp, wp), ((1, h), (2, w)))
        out = out.reshape(b, n, c)
        return self.proj(out), attn

    def _attend(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                valid: Optional[torch.Tensor], windows: Optional[Tuple[Tuple[int, int], int]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B', L, C) tokens, optional (B', L) real-token mask -> (B', L, C), the map passed on;
        ``windows``: the token grid and window side of windowed tokens (see ``refine``).

        Under autocast the maps (logits, softmax, refiner convs and BNs) stay in float32: the
        BNs normalise maps of nearly uniform probabilities, which would magnify 16-bit rounding
        (float32 maps more than halve the relative gradient error of a bf16 tiny model); the
        projections and the product with the values run in the compute dtype.
        """
        b, n, c = x.shape
        pairs = None if valid is None else valid[:, None, :, None] & valid[:, None, None, :]
        map_dtype = torch.float32 if output_dtype(x) != x.dtype else x.dtype
        if self.share:
            v = self.v(x).view(b, n, self.num_heads, -1).transpose(1, 2)
            with autocast_off(x.device):
                attn = self.dla.refine(prev.to(map_dtype), self.adapt_bn, self.scale, pairs,
                                       windows)
            passed = prev
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            with autocast_off(x.device):
                # The public code scales q and k by sqrt(scale) each: the same logits.
                attn = (q.to(map_dtype) * self.scale) @ k.to(map_dtype).transpose(-2, -1)
                if valid is not None:
                    # -inf on padding keys, in place (the logits are not kept for the
                    # backward); adding a (B', 1, 1, L) bias, not masked_fill_ with a
                    # broadcast mask (several times slower on the CPU, its backward too)
                    key_bias = torch.zeros_like(valid, dtype=attn.dtype)
                    attn.add_(key_bias.masked_fill_(~valid, float('-inf'))[:, None, None, :])
                attn = attn.softmax(dim=-1)
                if prev is not None:
                    attn = torch.add(attn, prev, alpha=self.scale)
            if valid is not None:  # padding queries: rows of zeros (the maps are finite)
                attn = attn * valid.to(attn.dtype)[:, None, :, None]
            passed = attn
        attn = self.attn_map(attn)
        return (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c), passed


class RefinerMlp(nn.Module):
    """fc1 -> GELU -> fc2 -> learnable per-channel scale (init 1e-5): (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.scale_channel = nn.Parameter(torch.full((dim, ), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) * self.scale_channel


class RefinerBlock(nn.Module):
    """``y, a = attn(norm1(x/2), prev); x += y*2; x += mlp(norm2(x/2))*2`` (with drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, share: bool,
                 window_size: int, qkv_bias: bool = True, drop_path: float = 0.,
                 dla_expansion: int = 3, dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinedAttention(dim, num_heads, share, window_size, qkv_bias,
                                     dla_expansion, dla_kernel_size, refiner_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefinerMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, prev: Optional[torch.Tensor],
                hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x * ADJUST_RATIO), prev, hw)
        x = x + self.drop_path(y) / ADJUST_RATIO
        x = x + self.drop_path(self.mlp(self.norm2(x * ADJUST_RATIO))) / ADJUST_RATIO
        return x, attn


class ConvPatchEmbed(nn.Module):
    """The public CNN stem: (B, in, H, W) -> (B, C, ceil(H/16), ceil(W/16)).

    conv 7x7/2 + BN + ReLU, conv 3x3 + BN + ReLU (x2), conv 8x8/8. The image is zero padded at
    the bottom/right to a multiple of 16 so that no pixel is dropped.
    """

    def __init__(self, in_channels: int, embed_dims: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(128, embed_dims, PATCH_SIZE // 2, stride=PATCH_SIZE // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_end(x, ((2, pad_to(h, PATCH_SIZE)), (3, pad_to(w, PATCH_SIZE))))
        if channels_last_on(x.device):
            # oneDNN's fast layout for these full-resolution convs (their backward is a large
            # part of a training step); the (B, C, h, w) output then flattens to tokens
            # without a copy
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        if channels_last_on(x.device) and not tracing():
            return self._patchify(x)
        return self.proj(x)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``self.proj`` (kernel = stride) as one matrix product over the patches of the
        channels-last (B, C, H, W) map: (B, embed, H/k, W/k), channels-last. On the CPU its
        backward runs faster than the strided convolution's (oneDNN)."""
        b, c, h, w = x.shape
        k = self.proj.stride[0]
        patches = x.permute(0, 2, 3, 1).reshape(b, h // k, k, w // k, k, c).transpose(2, 3)
        patches = patches.reshape(b, (h // k) * (w // k), k * k * c)
        weight = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        out = F.linear(patches, weight, self.proj.bias)
        return out.view(b, h // k, w // k, -1).permute(0, 3, 1, 2)


def _default_global_blocks(num_layers: int) -> Tuple[int, ...]:
    """A quarter of the blocks, ViTDet-like: one (computing, sharing) pair per 8 blocks (at least
    one), each the last pair of an equal segment of the depth."""
    num_pairs = (num_layers + 1) // 2
    segments = max(num_layers // 8, 1)
    pairs = sorted({max((s + 1) * num_pairs // segments - 1, 0) for s in range(segments)})
    return tuple(i for pair in pairs for i in (2 * pair, 2 * pair + 1) if i < num_layers)


@MODELS.register_module()
class RefinerViT(PyramidBackbone):
    """Refiner-ViT with windowed/global refined attention and a simple feature pyramid.

    Blocks alternate: even blocks compute attention (adding ``scale`` times the previous
    computed map), odd blocks share it through the refiner. Windowed blocks attend within
    ``window_size`` x ``window_size`` windows of the token grid (padded to the window; padding
    never influences real tokens); blocks in ``global_attn_indexes`` attend over the whole
    grid, and their refiner convs run on the full N x N maps (memory grows with N^2, see
    docs/backbones/refiner_vit.md). Maps are passed on between blocks of the same kind; the
    first computing block after a change of kind starts a new chain.

    Args:
        arch: ``'small'``/``'s'``, ``'medium'``/``'m'``, ``'large'``/``'l'`` or a dict with
            ``embed_dims``, ``num_layers``, ``num_heads``, ``mlp_ratio``.
        in_channels: image channels.
        pretrain_img_size: image size of the position embedding (grid ``size // 16``); it is
            interpolated (bicubic) to the grid of every input.
        window_size: window of the windowed blocks, in tokens (14: the pretraining map size).
        global_attn_indexes: blocks with global attention: ``None`` (a quarter of the blocks:
            one pair per 8 blocks, evenly spaced, the last pair included), ``'all'`` (the public
            classification model), or a sequence of block indices; a sharing block and the
            computing block before it must be both listed or both not.
        with_cls_token: keep the class token (needs ``global_attn_indexes='all'``); it is
            dropped from the pyramid inputs.
        pyramid_block_indexes: for each of the 4 pyramid levels, the block whose output feeds
            it; default the last block for every level (ViTDet). Blocks after the last one
            feeding a level in ``out_indices`` are not built (they would get no gradient, which
            stops DDP without ``find_unused_parameters``); their checkpoint keys are skipped.
        qkv_bias, dla_expansion, dla_kernel_size: as the public models (True, 3, 3).
        refiner_impl: how the refiners compute, the same numbers either way: ``'fused'`` (the
            hand-written chunked passes: ~4 instead of ~15 map-sized tensors kept per sharing
            block in training), ``'reference'`` (module by module: plain convs and
            BatchNorms), ``'auto'`` (per device type, see docs/devices.md); None (default):
            the environment variable ``MMVIT_REFINER_IMPL``, else ``'auto'``. Decided when
            the model is built; assigning the attribute ``refiner_impl`` changes it.
        out_indices: pyramid levels returned (strides 4, 8, 16, 32), each after ``out_norm{i}``.
        frozen_stages: -1 (none) or k: freeze the patch embedding, position embedding (and
            class token) and the first k blocks; ``num_layers`` freezes every parameter
            (pyramid and output norms included).
        norm_eval: keep every BatchNorm (stem, refiner) in eval mode while training; needed
            for batch independence in training, since these BNs otherwise use batch statistics.
        with_cp: gradient checkpointing per block.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        use_ema: load ``state_dict_ema`` from pretrained checkpoints that have one.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` loads a public checkpoint through
            :meth:`convert_checkpoint`.
    """
    arch_zoo = {
        **dict.fromkeys(['s', 'small'],
                        dict(embed_dims=384, num_layers=16, num_heads=12, mlp_ratio=3.)),
        **dict.fromkeys(['m', 'medium'],
                        dict(embed_dims=420, num_layers=32, num_heads=12, mlp_ratio=3.)),
        **dict.fromkeys(['l', 'large'],
                        dict(embed_dims=512, num_layers=32, num_heads=16, mlp_ratio=3.)),
    }
    _keys_not_in_public_checkpoints = ('out_norm', 'pyramid')
    checkpoint_layouts = (
        KeyLayout('Refiner-ViT, public layout', r'^blocks\.\d+\.attn\.DLA\.',
                  r'^blocks\.(\d+)\.', 'patch_embed.proj.weight'),
        KeyLayout('Refiner-ViT, converted layout', r'^blocks\.\d+\.attn\.dla\.',
                  r'^blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    )

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 window_size: int = 14,
                 global_attn_indexes: Union[None, str, Sequence[int]] = None,
                 with_cls_token: bool = False,
                 pyramid_block_indexes: Optional[Sequence[int]] = None,
                 qkv_bias: bool = True,
                 dla_expansion: int = 3,
                 dla_kernel_size: int = 3,
                 refiner_impl: Optional[str] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 drop_path_rate: float = 0.,
                 use_ema: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        arch = resolve_arch(arch, self.arch_zoo,
                            ('embed_dims', 'num_layers', 'num_heads', 'mlp_ratio'))
        embed_dims = check_int("arch['embed_dims']", arch['embed_dims'], low=1)
        num_layers = check_int("arch['num_layers']", arch['num_layers'], low=1)
        num_heads = check_int("arch['num_heads']", arch['num_heads'], low=1)
        super().__init__(in_channels, out_indices, frozen_stages, num_frozen_units=num_layers,
                         with_cp=with_cp, use_ema=use_ema, init_cfg=init_cfg)
        self.norm_eval = bool(norm_eval)
        check_heads([embed_dims], [num_heads])
        mlp_ratio = check_number("arch['mlp_ratio']", arch['mlp_ratio'], 0., math.inf,
                                 include_low=False)
        for name, value in (('pretrain_img_size', pretrain_img_size),
                            ('window_size', window_size), ('dla_expansion', dla_expansion),
                            ('dla_kernel_size', dla_kernel_size)):
            check_int(name, value, low=1)
        if pretrain_img_size % PATCH_SIZE:
            raise ValueError(f'pretrain_img_size={pretrain_img_size} is invalid; allowed values: '
                             f'multiples of the patch size {PATCH_SIZE}')
        check_probability('drop_path_rate', drop_path_rate)
        refiner_impl = resolve_refiner_impl(refiner_impl)
        global_blocks = self._check_global_blocks(global_attn_indexes, num_layers)
        if with_cls_token and len(global_blocks) != num_layers:
            raise ValueError("with_cls_token=True needs global_attn_indexes='all': windows hold "
                             'no class token')
        if pyramid_block_indexes is None:
            pyramid_block_indexes = (num_layers - 1, ) * 4
        self.pyramid_block_indexes = check_indices(
            'pyramid_block_indexes', pyramid_block_indexes, num_layers, 'block', unique=False)
        if len(self.pyramid_block_indexes) != len(PYRAMID_STRIDES):
            raise ValueError(f'pyramid_block_indexes={tuple(pyramid_block_indexes)} is invalid; '
                             'allowed values: 4 block indices, one per pyramid level')

        self.embed_dims = embed_dims
        self.num_layers = num_layers
        self.num_features = [embed_dims] * 4
        self._feature_blocks = sorted({self.pyramid_block_indexes[i] for i in self.out_indices})
        # where forward_tokens puts every output's tokens
        self._output_tokens = tuple(self._feature_blocks.index(self.pyramid_block_indexes[i])
                                    for i in self.out_indices)

        self.patch_embed = ConvPatchEmbed(in_channels, embed_dims)
        self.pos_grid = (pretrain_img_size // PATCH_SIZE, ) * 2
        self.num_extra_tokens = int(with_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims)) if with_cls_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_extra_tokens + self.pos_grid[0] * self.pos_grid[1],
                        embed_dims))
        rates = drop_path_rates(drop_path_rate, num_layers)
        # blocks after the last one feeding an output would get no gradient: not built
        self.blocks = nn.ModuleList([
            RefinerBlock(embed_dims, num_heads, mlp_ratio, share=i % 2 == 1,
                         window_size=0 if i in global_blocks else window_size,
                         qkv_bias=qkv_bias, drop_path=rates[i], dla_expansion=dla_expansion,
                         dla_kernel_size=dla_kernel_size, refiner_impl=refiner_impl)
            for i in range(self._feature_blocks[-1] + 1)
        ])
        self._refiner_impl = refiner_impl
        self.pyramid = SimpleFeaturePyramid(embed_dims, self.out_indices)
        self._add_out_norms(self.num_features, LayerNorm2d)
        self._finish_init()

    @property
    def refiner_impl(self) -> str:
        """The refiners' implementation (see ``refiner_impl`` in the class docs); assigning it
        (None: ``MMVIT_REFINER_IMPL``, else ``'auto'``) sets every refiner's."""
        return self._refiner_impl

    @refiner_impl.setter
    def refiner_impl(self, impl: Optional[str]) -> None:
        impl = self._refiner_impl = resolve_refiner_impl(impl)
        for block in self.blocks:
            if block.attn.share:
                block.attn.dla.refiner_impl = impl

    @staticmethod
    def _check_global_blocks(indexes: Union[None, str, Sequence[int]],
                             num_layers: int) -> Tuple[int, ...]:
        if indexes is None:
            return _default_global_blocks(num_layers)
        if isinstance(indexes, str):
            if indexes != 'all':
                raise ValueError(f"global_attn_indexes={indexes!r} is invalid; allowed values: "
                                 "None, 'all' or a sequence of block indices")
            return tuple(range(num_layers))
        blocks = set(check_indices('global_attn_indexes', indexes, num_layers, 'block',
                                   allow_empty=True))
        for share in range(1, num_layers, 2):
            if (share in blocks) != (share - 1 in blocks):
                raise ValueError(
                    f'global_attn_indexes={tuple(indexes)} is invalid: sharing block {share} '
                    f'reuses the map of block {share - 1}, so list both or neither')
        return tuple(sorted(blocks))

    def _init_extra_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)

    # -- pretrained weights -----------------------------------------------------------------
    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Public Refiner-ViT keys -> this module's (idempotent on converted checkpoints).

        Drops the classifier heads and final norm (and the class token unless
        ``with_cls_token``), renames ``attn.DLA`` -> ``attn.dla`` and the sharing blocks'
        value-only ``attn.qkv`` -> ``attn.v``, and resizes the position embedding to
        ``pretrain_img_size``.
        """
        converted, dropped = {}, []
        for key, value in state_dict.items():
            if key.startswith(_CLASSIFIER_KEYS) or (key == 'cls_token' and self.cls_token is None):
                dropped.append(key)
                continue
            key = key.replace('.attn.DLA.', '.attn.dla.')
            parts = key.split('.')
            if (parts[0] == 'blocks' and parts[1].isdigit() and int(parts[1]) < len(self.blocks)
                    and parts[2:4] == ['attn', 'qkv'] and self.blocks[int(parts[1])].attn.share):
                key = '.'.join(parts[:3] + ['v'] + parts[4:])
            converted[key] = value
        if 'pos_embed' in converted:
            converted['pos_embed'] = self._convert_pos_embed(converted['pos_embed'])
        if dropped:
            print_log(f'RefinerViT: dropped classification-only keys {dropped}', logger='current')
        return converted

    def _convert_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        """(1, extra + g*g, C) of a public checkpoint -> this model's (1, extra' + gh*gw, C)."""
        if pos_embed.shape == self.pos_embed.shape:
            return pos_embed
        num_tokens = pos_embed.shape[1]
        grid = math.isqrt(num_tokens)
        extra = num_tokens - grid * grid
        if extra not in (0, 1) or extra < self.num_extra_tokens:
            raise ValueError(f'checkpoint pos_embed {tuple(pos_embed.shape)} is not a square grid '
                             f'with {self.num_extra_tokens} class token')
        grid_embed = resample_abs_pos_embed(pos_embed[:, extra:], self.pos_grid, (grid, grid),
                                            num_prefix_tokens=0, antialias=False)
        return torch.cat([pos_embed[:, :self.num_extra_tokens], grid_embed], dim=1)

    def unbuilt_key_prefixes(self) -> Tuple[str, ...]:
        """The output norms and pyramid levels not in ``out_indices``, and the blocks after the
        last one feeding a level."""
        levels = [i for i in range(len(PYRAMID_STRIDES)) if i not in self.out_indices]
        return tuple([f'out_norm{i}.' for i in levels] + [f'pyramid.level{i}.' for i in levels]
                     + [f'blocks.{i}.' for i in range(len(self.blocks), self.num_layers)])

    # -- freezing ----------------------------------------------------------------------------
    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """The stem and embeddings, the first ``frozen_stages`` blocks; all blocks freeze the
        pyramid and the output norms too (nothing is left to train)."""
        embeddings = nn.ParameterList(
            [p for p in (self.pos_embed, self.cls_token) if p is not None])
        modules = [self.patch_embed, embeddings, *self.blocks[:frozen_stages]]
        if frozen_stages == self.num_layers:
            modules += [self.pyramid, *(getattr(self, f'out_norm{i}') for i in self.out_indices)]
        return modules

    # -- forward -----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """As every backbone's, and: in training, every refiner BatchNorm in training mode
        must see more than one value per channel (its batch statistics)."""
        super().check_input(x)
        if not self.training or x.shape[0] != 1:
            return
        h, w = (-(-size // PATCH_SIZE) for size in x.shape[-2:])
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if not (attn.share and attn.adapt_bn.training):
                continue
            ws = attn.window_size
            # maps (B', heads, L, L): one global map of the tokens, or one per window
            values = (h * w + self.num_extra_tokens)**2 if not ws else \
                -(-h // ws) * -(-w // ws) * ws**4
            if values == 1:
                raise ValueError(
                    f'RefinerViT in training mode got a batch of 1 image of '
                    f'{tuple(x.shape[-2:])} pixels: a {h}x{w} token grid gives the BatchNorm '
                    f'layers of the refiner in block {i} one value per channel, so there are no '
                    'batch statistics. Use norm_eval=True (BatchNorm layers in eval mode), a '
                    f'batch of more than 1 image, or images larger than {PATCH_SIZE}x'
                    f'{PATCH_SIZE} pixels (more than one token)')

    def forward_tokens(self, x: torch.Tensor, blocks: Optional[Sequence[int]] = None
                       ) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """(B, in_channels, H, W) -> the outputs of ``blocks`` (ascending block indices;
        default: the blocks feeding the returned levels) as (B, extra + h*w, C), class token
        first, and the token grid (h, w) = (ceil(H/16), ceil(W/16)). Blocks after the last
        one asked for do not run; blocks after the last one feeding an output are not built."""
        if blocks is None:
            blocks = self._feature_blocks
        elif blocks[-1] >= len(self.blocks):
            raise ValueError(f'blocks={tuple(blocks)} is invalid: blocks 0..{len(self.blocks) - 1} '
                             f'are built (the last one feeding out_indices={self.out_indices} '
                             f'through pyramid_block_indexes={self.pyramid_block_indexes})')
        self.check_input(x)
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_abs_pos_embed(self.pos_embed, (h, w), self.pos_grid,
                                     num_prefix_tokens=self.num_extra_tokens)
        outs, attn = [], None
        for i, block in enumerate(self.blocks):
            if i > blocks[-1]:
                break
            if i and not block.attn.share and \
                    block.attn.window_size != self.blocks[i - 1].attn.window_size:
                attn = None  # window maps and global maps differ in shape: a new chain starts
            if self.with_cp and x.requires_grad:
                x, attn = checkpoint(block, x, attn, (h, w))
            else:
                x, attn = block(x, attn, (h, w))
            if contains(blocks, i):
                outs.append(x)
        return outs, (h, w)

    def forward(self, x: torch.Tensor, norm: bool = True) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> one (B, embed_dims, ceil(H/s), ceil(W/s)) map per
        ``out_indices`` entry, s = 4 * 2**i, all in one dtype (autocast's under it);
        ``norm=False`` leaves out the ``out_norm{i}`` (timm's ``forward_intermediates``).

        The token grid covers the image padded to a multiple of 16; every level is cropped to
        the maps of the real pixels, as the hierarchical backbones give."""
        self.check_input(x)
        dtype, size = output_dtype(x), x.shape[-2:]
        tokens, (h, w) = self.forward_tokens(x)
        feats = []
        for i in self._output_tokens:
            t = tokens[i][:, self.num_extra_tokens:]
            if channels_last_on(x.device):
                # a channels-last view, no copy: the pyramid's transposed convs and norms run
                # faster on it (oneDNN), with the same numbers
                feats.append(t.reshape(t.shape[0], h, w, self.embed_dims).permute(0, 3, 1, 2))
            else:
                feats.append(t.transpose(1, 2).reshape(t.shape[0], self.embed_dims, h, w))
        outs = []
        # the levels as constants of range() (dynamo may make the ints of out_indices symbolic)
        levels = [i for i in range(len(PYRAMID_STRIDES)) if contains(self.out_indices, i)]
        for i, out in zip(levels, self.pyramid(feats)):
            stride = PYRAMID_STRIDES[i]
            if norm:
                out = getattr(self, f'out_norm{i}')(out)
            out = crop_end(out, ((2, ceil_div(size[0], stride)), (3, ceil_div(size[1], stride))))
            outs.append(out.contiguous().to(dtype))
        return tuple(outs)
