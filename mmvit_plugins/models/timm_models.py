"""The plugin's backbones as timm classification models, registered on ``import mmvit_plugins``.

``timm.create_model('boat_cswin_tiny')`` is the dense backbone's trunk plus the public model's
final norm and classifier, so a converted public checkpoint gives the papers' logits (and
``python -m timm validate``-style evaluation); ``features_only=True`` gives the mm backbone's
four maps (strides 4/8/16/32, each after its ``out_norm{i}``) at any input size;
``forward_intermediates`` follows timm's conventions (every ``feature_info`` level by default,
``indices``, ``norm``, ``stop_early``, ``intermediates_only``). Keyword
arguments of ``create_model`` go to the backbone (``arch=dict(...)``, ``drop_path_rate``,
``window_size``, ...). Nothing is ever downloaded: ``pretrained=True`` reads the file named by
the pretrained config, ``pretrained_cfg_overlay=dict(file=path)`` (see ``docs/timm.md``).

Models: ``boat_swin_{tiny,small,base}``, ``boat_cswin_{tiny,small,base}``,
``maformer_{tiny,s,b,l}`` (stage 3 -> ``out_norm3`` = the public final ``norm`` -> global
average pool -> Linear ``head.fc``) and ``refiner_vit_{s,m,l}`` (class token, final ``norm``,
``head`` on the class token plus half the maximum over the patch tokens of ``aux_head``).
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from mmengine.logging import print_log
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not exported by timm.models
from torch import nn

from mmvit_plugins.checkpoint import describe_keys, other_family

from .backbones import BOATCSWin, BOATSwin, MAFormer, RefinerViT
from .backbones.base import (
    PyramidBackbone,
    check_out_indices,
    init_linear_and_norm,
    output_dtype,
)
from .backbones.refiner_vit import PATCH_SIZE
from .layers.pyramid import PYRAMID_STRIDES

__all__ = ['PyramidClassifier', 'RefinerViTClassifier', 'checkpoint_filter_fn']

NUM_STAGES = len(PYRAMID_STRIDES)
_BACKBONE = 'backbone.'
# forward_intermediates' result: the maps, preceded by the final features unless only the maps
Intermediates = Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]
# Parameters the public models exclude from weight decay (Swin's and ViT's no_weight_decay).
_NO_WEIGHT_DECAY = ('relative_position_bias_table', 'pos_embed', 'cls_token')


class _TimmModel(nn.Module):
    """What the timm models share: the mm backbone as ``self.backbone`` built with
    ``out_indices`` (its per-stage norms exist only for those stages), ``forward_intermediates``
    and ``prune_intermediate_layers`` as timm defines them (over ``feature_info``, see
    :func:`timm.models._features.feature_take_indices`), and checkpoint key mapping (see
    :func:`checkpoint_filter_fn`). Subclasses define ``feature_info``, the classifier
    (``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``) and
    ``_intermediates``."""
    backbone_cls: Type[PyramidBackbone]
    # Top-level (non-backbone) key prefixes of public checkpoints that this model owns.
    head_prefixes: Tuple[str, ...] = ('head.', )

    def _build_backbone(self, in_chans: int, out_indices: Sequence[int], **kwargs) -> None:
        self.stage_indices = check_out_indices(tuple(out_indices), NUM_STAGES)
        self.backbone = self.backbone_cls(in_channels=in_chans, out_indices=self.stage_indices,
                                          **kwargs)
        self.num_features = self.head_hidden_size = self.backbone.num_features[-1]

    def _pyramid_feature_info(self) -> List[dict]:
        """The four levels of the mm backbone (strides 4, 8, 16, 32)."""
        return [dict(num_chs=width, reduction=stride, module=f'{_BACKBONE}stages.{i}')
                for i, (width, stride) in enumerate(zip(self.backbone.num_features,
                                                        PYRAMID_STRIDES))]

    # -- timm API ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes), or (B, num_features) if
        ``num_classes=0``."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters()
                if name.rsplit('.', 1)[-1] in _NO_WEIGHT_DECAY}

    def _take_indices(self, indices: Union[None, int, Sequence[int]]) -> Tuple[List[int], int]:
        """timm's ``indices`` over ``feature_info`` (None: all; n: the last n; a sequence,
        negative allowed) -> (sorted indices, the largest)."""
        num = len(self.feature_info)
        try:
            take, _ = feature_take_indices(num, indices)
        except (AssertionError, TypeError) as err:
            raise ValueError(f'indices={indices!r} is invalid ({err}); allowed values: None '
                             f'(all {num} levels of feature_info), n in [1, {num}] (the last n) '
                             f'or a sequence of indices in [{-num}, {num - 1}]') from err
        take = sorted(set(take))
        return take, take[-1]

    def forward_intermediates(
            self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
            intermediates_only: bool = False
    ) -> Intermediates:
        """(B, in_chans, H, W) -> the maps of the ``feature_info`` levels in ``indices``
        (default: all), each (B, num_chs, ceil(H/r), ceil(W/r)) for its reduction r, preceded
        by ``forward_features(x)`` unless ``intermediates_only``.

        ``norm=True`` passes each map through the norm the model holds for it (see the
        subclass); ``stop_early`` skips what follows the last requested level when only the
        intermediates are returned (the final features need the whole trunk).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is invalid; allowed values: 'NCHW'")
        take, last = self._take_indices(indices)
        return self._intermediates(x, take, norm, last if stop_early and intermediates_only
                                   else None, intermediates_only)

    def _intermediates(self, x: torch.Tensor, take: List[int], norm: bool,
                       stop: Optional[int], intermediates_only: bool) -> Intermediates:
        raise NotImplementedError

    def _refuse_unbuilt(self, what: str, unbuilt: List[int], take: List[int],
                        why: str = '') -> None:
        """A ValueError naming the requested ``unbuilt`` levels (``what``) and how to build them."""
        if unbuilt:
            raise ValueError(f'{what} {unbuilt} are not built: the backbone was built with '
                             f'out_indices={self.stage_indices}{why}; create the model with '
                             f'features_only=True and out_indices={tuple(take)}')

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """For a feature extractor (timm's ``FeatureGetterNet``): drop the classifier
        (``prune_head``) and the norms of the maps (``prune_norm``, for ``norm=False``);
        return the indices. The trunk is kept whole (frozen stages index into it)."""
        take, _ = self._take_indices(indices)
        if prune_head:
            self.reset_classifier(0, '')
        if prune_norm:
            for i in self.stage_indices:
                self.backbone.add_module(f'out_norm{i}', nn.Identity())
        return take

    # -- checkpoints -------------------------------------------------------------------------
    def head_key(self, key: str) -> str:
        """A public (or own) classifier key -> this model's."""
        return key

    def fill_from_init(self, key: str) -> bool:
        """Whether a backbone key absent from a checkpoint keeps its initial value: the keys
        public classification checkpoints never hold (see the backbone's
        ``_keys_not_in_public_checkpoints``)."""
        return key.startswith(self.backbone._keys_not_in_public_checkpoints)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: _TimmModel) -> Dict[str, torch.Tensor]:
    """A checkpoint in the public classification layout, the mm backbone's layout or this
    model's own -> this model's state dict.

    Classifier keys (``model.head_prefixes``) are renamed by ``model.head_key``; every other key
    (``backbone.`` prefix removed) goes through the backbone's ``loadable_state_dict``: its
    ``convert_checkpoint``, the only copy of the public key rules (e.g. BOAT's public final
    ``norm`` -> ``out_norm3``), less the keys of the stages ``out_indices`` leaves unbuilt. Backbone
    keys public checkpoints never hold (the norms of the other stages, Refiner-ViT's pyramid)
    keep the model's initial values, as the mm backbone's loader leaves them; such keys of an
    mm backbone checkpoint that the model does not have (e.g. the pyramid of a Refiner-ViT
    classifier) are dropped.
    """
    head, trunk = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE):
            trunk[key[len(_BACKBONE):]] = value
        elif key.startswith(model.head_prefixes):
            head[model.head_key(key)] = value
        else:
            trunk[key] = value
    own = model.backbone.state_dict()
    families = other_family(trunk, own)
    if families:
        raise ValueError(f'{type(model).__name__}: the checkpoint holds {families[0]} weights '
                         f'({describe_keys(trunk)}), the model is {families[1]}: weights of '
                         'another family are never loaded')
    converted = model.backbone.loadable_state_dict(trunk)
    converted = {k: v for k, v in converted.items()
                 if k in own or not k.startswith(model.backbone._keys_not_in_public_checkpoints)}
    filled = []
    for key, value in own.items():
        if key not in converted and model.fill_from_init(key):
            converted[key] = value
            filled.append(key)
    if filled:
        print_log(f'{type(model).__name__}: keys not in the checkpoint keep their initial '
                  f'values: {filled}', logger='current')
    return {**{_BACKBONE + k: v for k, v in converted.items()}, **head}


class PyramidClassifier(_TimmModel):
    """A hierarchical backbone (BOAT-Swin, BOAT-CSWin, MAFormer) as a timm classifier.

    Logits as the public BOAT models compute them: stage 3 -> its norm ``out_norm3`` (the
    public final ``norm``) -> global average pooling -> Linear ``head.fc``. MAFormer has no
    public code; it gets the same head.

    ``feature_info`` lists the four stages (strides 4, 8, 16, 32). ``forward_intermediates``
    returns the stage outputs; with ``norm=True`` each passes through its norm ``out_norm{i}``
    where the model has one: the classifier only the final norm ``out_norm3`` (timm's rule:
    the final norm on the last stage), a model built with ``out_indices`` (``features_only``)
    one per stage in it, which gives the mm backbone's maps.

    Args:
        num_classes: classes of ``head.fc``; 0 for pooled features of ``num_features`` width.
        in_chans: image channels (the backbone's ``in_channels``).
        global_pool: timm's pooling types (``'avg'`` as the public models).
        out_indices: stages the backbone returns (each after ``out_norm{i}``); default ``(3,)``,
            the classifier's input; ``features_only=True`` sets it from its ``out_indices``.
        **kwargs: the backbone's arguments (``arch``, ``drop_rate``, ``drop_path_rate``,
            ``window_size``, ``with_cp``, ...).
    """
    _final_stage = NUM_STAGES - 1

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = 'avg',
                 out_indices: Optional[Sequence[int]] = None, **kwargs):
        super().__init__()
        self._build_backbone(in_chans, (self._final_stage, ) if out_indices is None
                             else out_indices, **kwargs)
        self.feature_info = self._pyramid_feature_info()
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   input_fmt='NCHW')
        self.head.apply(init_linear_and_norm)

    def _check_final_stage(self) -> None:
        if self._final_stage not in self.stage_indices:
            raise ValueError(f'the classifier reads stage {self._final_stage}, but the backbone '
                             f'was built with out_indices={self.stage_indices}')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the normed last stage map (B, num_features, H/32, W/32)."""
        self._check_final_stage()
        return self.backbone(x)[-1]

    def _intermediates(self, x: torch.Tensor, take: List[int], norm: bool,
                       stop: Optional[int], intermediates_only: bool) -> Intermediates:
        if not intermediates_only:
            self._check_final_stage()
        backbone = self.backbone
        self._refuse_unbuilt('stages', [i for i in take if i >= len(backbone.stages)], take,
                             ' (stages after the last one are not built)')
        backbone.check_input(x)
        dtype = output_dtype(x)
        final = self._final_stage
        outs = dict(backbone.stage_outputs(x, take if intermediates_only else [*take, final],
                                           stop))
        intermediates = [backbone.stage_map(i, outs[i], dtype, norm) for i in take]
        if intermediates_only:
            return intermediates
        return backbone.stage_map(final, outs[final], dtype), intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or pooled (B, C) if ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.apply(init_linear_and_norm)

    def head_key(self, key: str) -> str:
        """Public ``head.{weight,bias}`` -> ``head.fc.*``; own ``head.fc.*`` unchanged."""
        return key if key.startswith('head.fc.') else 'head.fc.' + key[len('head.'):]

    def fill_from_init(self, key: str) -> bool:
        # the final norm comes from the public checkpoint's ``norm``: never left at init
        return super().fill_from_init(key) and not key.startswith(f'out_norm{self._final_stage}.')


class BOATSwinClassifier(PyramidClassifier):
    backbone_cls = BOATSwin


class BOATCSWinClassifier(PyramidClassifier):
    backbone_cls = BOATCSWin


class MAFormerClassifier(PyramidClassifier):
    backbone_cls = MAFormer


class RefinerViTClassifier(_TimmModel):
    """Refiner-ViT as the public classifier (Refiner_ViT's inference forward).

    Tokens of the last block -> ``norm`` (LayerNorm, eps 1e-6) -> ``head`` on the class token,
    plus ``0.5 * max`` over the patch tokens of ``aux_head`` when ``return_dense`` (the public
    default; its models trained without token labelling have no ``aux_head``). The same
    formula in training mode: the public token-labelling training (MixToken, dense targets)
    is not reproduced.

    ``feature_info`` and ``forward_intermediates`` follow timm's ViT: one level per block
    (stride 16), the patch tokens as (B, C, h, w) maps, ``norm=True`` through the final
    ``norm``. A model built with ``out_indices`` (``features_only``) instead has the mm
    backbone's pyramid: four levels (strides 4, 8, 16, 32), of which those in ``out_indices``
    are built, ``norm=True`` through their ``out_norm{i}``.

    Args:
        num_classes: classes of both heads; 0 for pooled features (``num_features`` wide).
        in_chans: image channels.
        global_pool: ``'token'`` (the class token, as the public model; needs
            ``with_cls_token``) or ``'avg'`` (mean of the normed patch tokens); default the
            former with a class token, else the latter.
        drop_rate: dropout before the heads (the backbone has no dropout).
        return_dense: build ``aux_head`` (as the public ``return_dense``).
        out_indices: pyramid levels the backbone returns (its ``forward``, used by
            ``features_only``). Default: none; the backbone then returns its stride-16 level
            without a norm (``out_norm2`` is ``nn.Identity``), which the classifier does not
            use, so that every parameter of the classifier is trained.
        with_cls_token, global_attn_indexes: the backbone's, defaults as the public classifier
            (a class token, global attention in every block).
        **kwargs: the backbone's other arguments (``arch``, ``drop_path_rate``,
            ``refiner_impl``, ...).
    """
    backbone_cls = RefinerViT
    head_prefixes = ('head.', 'aux_head.', 'norm.')
    _pools = ('token', 'avg')
    _unused_level = 2

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: Optional[str] = None, drop_rate: float = 0.,
                 return_dense: bool = True, out_indices: Optional[Sequence[int]] = None,
                 with_cls_token: bool = True,
                 global_attn_indexes: Union[None, str, Sequence[int]] = 'all', **kwargs):
        super().__init__()
        self.pyramid_levels = out_indices is not None
        self._build_backbone(in_chans, (self._unused_level, ) if out_indices is None
                             else out_indices, with_cls_token=with_cls_token,
                             global_attn_indexes=global_attn_indexes, **kwargs)
        if self.pyramid_levels:
            self.feature_info = self._pyramid_feature_info()
        else:
            # the stride-16 level needs no parameters but its norm
            self.backbone.add_module(f'out_norm{self._unused_level}', nn.Identity())
            self.feature_info = [
                dict(num_chs=self.num_features, reduction=PATCH_SIZE,
                     module=f'{_BACKBONE}blocks.{i}') for i in range(self.backbone.num_layers)]
        last = self.backbone.num_layers - 1
        fed = {self.backbone.pyramid_block_indexes[i] for i in self.stage_indices}
        if last not in fed:
            raise ValueError(f'the heads read block {last}, but pyramid_block_indexes='
                             f'{self.backbone.pyramid_block_indexes} feed no built level from it')
        self.num_extra_tokens = int(with_cls_token)
        self.num_classes = num_classes
        self.return_dense = return_dense
        self.global_pool = self._check_pool(global_pool)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self._build_heads()

    def _check_pool(self, global_pool: Optional[str]) -> str:
        if global_pool is None:
            return 'token' if self.num_extra_tokens else 'avg'
        if global_pool not in self._pools:
            raise ValueError(f'global_pool={global_pool!r} is invalid; allowed values: '
                             f'{self._pools}')
        if global_pool == 'token' and not self.num_extra_tokens:
            raise ValueError("global_pool='token' needs with_cls_token=True; use 'avg'")
        return global_pool

    def _build_heads(self) -> None:
        def linear() -> nn.Module:
            return nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 \
                else nn.Identity()

        self.head = linear()
        self.aux_head = linear() if self.return_dense else None
        for head in (self.head, self.aux_head):
            if head is not None:
                head.apply(init_linear_and_norm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normed tokens of the last block (B, extra + h*w, C), class
        token first."""
        tokens, _ = self.backbone.forward_tokens(x, (self.backbone.num_layers - 1, ))
        return self.norm(tokens[-1])

    def forward_intermediates(
            self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = 'NCHW', intermediates_only: bool = False
    ) -> Intermediates:
        """As the base; as timm's ViT, ``return_prefix_tokens`` pairs each block's map with
        its class token (B, 1, C), and ``output_fmt='NLC'`` keeps the (B, h*w, C) tokens
        (both only for the block levels, not the pyramid)."""
        allowed = ('NCHW', ) if self.pyramid_levels else ('NCHW', 'NLC')
        if output_fmt not in allowed:
            raise ValueError(f'output_fmt={output_fmt!r} is invalid; allowed values: {allowed}')
        if return_prefix_tokens and self.pyramid_levels:
            raise ValueError('return_prefix_tokens=True is invalid for the pyramid levels of a '
                             'model built with out_indices (features_only): they hold no '
                             'class token')
        take, last = self._take_indices(indices)
        stop = last if stop_early and intermediates_only else None
        if self.pyramid_levels:
            return self._intermediates(x, take, norm, stop, intermediates_only)
        return self._block_intermediates(x, take, norm, stop, intermediates_only,
                                         return_prefix_tokens, output_fmt == 'NCHW')

    def _block_intermediates(self, x: torch.Tensor, take: List[int], norm: bool,
                             stop: Optional[int], intermediates_only: bool,
                             return_prefix_tokens: bool, reshape: bool) -> Any:
        """timm's ViT ``forward_intermediates`` over the blocks."""
        last = self.backbone.num_layers - 1
        blocks = sorted(set(take) | ({last} if stop is None and not intermediates_only
                                     else set()))
        tokens, (h, w) = self.backbone.forward_tokens(x, blocks)
        by_block = dict(zip(blocks, tokens))
        intermediates = []
        for i in take:
            t = self.norm(by_block[i]) if norm else by_block[i]
            prefix, t = t[:, :self.num_extra_tokens], t[:, self.num_extra_tokens:]
            if reshape:
                t = t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((t, prefix) if return_prefix_tokens else t)
        if intermediates_only:
            return intermediates
        return self.norm(by_block[last]), intermediates

    def _intermediates(self, x: torch.Tensor, take: List[int], norm: bool,
                       stop: Optional[int], intermediates_only: bool) -> Intermediates:
        """The pyramid levels in ``take`` (each built: in ``out_indices``)."""
        self._refuse_unbuilt('pyramid levels', sorted(set(take) - set(self.stage_indices)), take)
        maps = dict(zip(self.stage_indices, self.backbone(x, norm=norm)))
        intermediates = [maps[i] for i in take]
        if intermediates_only:
            return intermediates
        return self.forward_features(x), intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, extra + N, C) normed tokens -> logits (B, num_classes), or the pooled token
        (B, C) if ``pre_logits`` or ``num_classes == 0``."""
        patches = x[:, self.num_extra_tokens:]
        pooled = x[:, 0] if self.global_pool == 'token' else patches.mean(dim=1)
        pooled = self.head_drop(pooled)
        if pre_logits or self.num_classes == 0:
            return pooled
        logits = self.head(pooled)
        if self.aux_head is not None:
            logits = logits + 0.5 * self.aux_head(self.head_drop(patches)).amax(dim=1)
        return logits

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None and global_pool != '':
            self.global_pool = self._check_pool(global_pool)
        self._build_heads()

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """As the base, and the final ``norm``: with ``prune_norm`` (as timm's ViT); for the
        pyramid levels, which it does not normalise, also with ``prune_head``."""
        take = super().prune_intermediate_layers(
            indices, prune_norm and self.pyramid_levels, prune_head)
        if prune_norm or (prune_head and self.pyramid_levels):
            self.norm = nn.Identity()
        return take


# -- registration ------------------------------------------------------------------------------
_BOAT_REPO = 'https://github.com/mahaoyuHKU/pytorch-boat'
_REFINER_REPO = 'https://github.com/zhoudaquan/Refiner_ViT'


# The pyramid classifiers' forward_features map at the configs' 224x224 input (stride 32).
_POOL_SIZE = (224 // PYRAMID_STRIDES[-1], ) * 2


def _cfg(file: Optional[str] = None, **kwargs) -> dict:
    """A pretrained config that never downloads: no ``url``/``hf_hub_id``; ``file`` is the
    public checkpoint's file name as published (read from the working directory unless
    ``pretrained_cfg_overlay=dict(file=path)``). ``pool_size`` stays None for Refiner-ViT,
    whose ``forward_features`` returns tokens (as timm's ViTs)."""
    return {**dict(url='', hf_hub_id=None, file=file, num_classes=1000,
                   input_size=(3, 224, 224), pool_size=None, interpolation='bicubic',
                   first_conv='backbone.patch_embed.proj', classifier='head.fc'), **kwargs}


def _boat(file: str, link: str, **kwargs) -> dict:
    return _cfg(file, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, license='mit',
                pool_size=_POOL_SIZE,
                paper_ids='arXiv:2201.13027', origin_url=f'{link} (from {_BOAT_REPO})', **kwargs)


def _refiner(crop_pct: float, **kwargs) -> dict:
    # mean/std 0.5 and the crop of the public default_cfgs
    return _cfg(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=crop_pct,
                first_conv='backbone.patch_embed.conv1', classifier=('head', 'aux_head'),
                paper_ids='arXiv:2106.03714', origin_url=_REFINER_REPO, **kwargs)


def _maformer() -> dict:
    return _cfg(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.9,
                pool_size=_POOL_SIZE, paper_ids='arXiv:2209.01620',
                notes=('no public code or checkpoint; crop and mean/std chosen as CSWin', ))


# BOAT-Swin evaluates at crop 224/256 (Swin's pipeline), BOAT-CSWin at 0.9 (its default_cfgs).
default_cfgs = generate_default_cfgs({
    'boat_swin_tiny': _boat('tiny.pth', 'https://www.dropbox.com/s/xa94uewsrvjglnn/tiny.pth',
                            crop_pct=0.875),
    'boat_swin_small': _boat('small.pth',
                             'https://www.dropbox.com/s/7ih1zvii3bvdcgd/small.pth',
                             crop_pct=0.875),
    'boat_swin_base': _boat('base.pth', 'https://www.dropbox.com/s/70hr7h0smcr0gr9/base.pth',
                            crop_pct=0.875),
    'boat_cswin_tiny': _boat('cswin_tiny.pth.tar',
                             'https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar',
                             crop_pct=0.9),
    'boat_cswin_small': _boat('cswin_small.pth.tar',
                              'https://www.dropbox.com/s/cnl00d1faxxoi19/cswin_small.pth.tar',
                              crop_pct=0.9),
    'boat_cswin_base': _boat('cswin_base.pth.tar',
                             'https://www.dropbox.com/s/92sr8r8zhng1mqg/cswin_base.pth.tar',
                             crop_pct=0.9),
    'refiner_vit_s': _refiner(0.9),
    'refiner_vit_m': _refiner(1.0),
    'refiner_vit_l': _refiner(1.13, notes=(
        'the only published checkpoint is Refiner-ViT-L at 448 (Google Drive link in the '
        'README, no file name): pretrain_img_size=448, input_size=(3, 448, 448)', )),
    'maformer_tiny': _maformer(),
    'maformer_s': _maformer(),
    'maformer_b': _maformer(),
    'maformer_l': _maformer(),
})


def _create(cls: Type[_TimmModel], variant: str, preset: str, pretrained: bool,
            **kwargs) -> nn.Module:
    """Build through timm's ``build_model_with_cfg``; ``features_only`` builds the backbone
    with the requested ``out_indices`` and wraps the model in timm's ``FeatureGetterNet``."""
    kwargs.setdefault('arch', preset)
    model_cls: Callable[..., nn.Module] = cls
    feature_cfg = dict(kwargs.pop('feature_cfg', None) or {})
    if kwargs.get('features_only'):
        feature_cls = kwargs.pop('feature_cls', feature_cfg.pop('feature_cls', 'getter'))
        if feature_cls != 'getter':
            raise ValueError(f"feature_cls={feature_cls!r} is invalid; allowed values: 'getter' "
                             "(the backbone's stages are no sequential modules that hooks could "
                             'read)')
        out_indices = check_out_indices(kwargs.get('out_indices', tuple(range(NUM_STAGES))),
                                        NUM_STAGES)
        kwargs['out_indices'] = out_indices  # timm's builder moves it to the feature wrapper
        model_cls = partial(cls, out_indices=out_indices)
    # norm=True (default): the mm backbone's maps, each after its out_norm{i}
    feature_cfg.setdefault('norm', True)
    feature_cfg['feature_cls'] = 'getter'
    return build_model_with_cfg(model_cls, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


# name -> (classifier, backbone arch); one entrypoint each, registered under its name
_ENTRYPOINTS: Dict[str, Tuple[Type[_TimmModel], str]] = {
    'boat_swin_tiny': (BOATSwinClassifier, 'tiny'),
    'boat_swin_small': (BOATSwinClassifier, 'small'),
    'boat_swin_base': (BOATSwinClassifier, 'base'),
    'boat_cswin_tiny': (BOATCSWinClassifier, 'tiny'),
    'boat_cswin_small': (BOATCSWinClassifier, 'small'),
    'boat_cswin_base': (BOATCSWinClassifier, 'base'),
    'refiner_vit_s': (RefinerViTClassifier, 'small'),
    'refiner_vit_m': (RefinerViTClassifier, 'medium'),
    'refiner_vit_l': (RefinerViTClassifier, 'large'),
    'maformer_tiny': (MAFormerClassifier, 'tiny'),
    'maformer_s': (MAFormerClassifier, 'small'),
    'maformer_b': (MAFormerClassifier, 'base'),
    'maformer_l': (MAFormerClassifier, 'large'),
}


def _entrypoint(variant: str, cls: Type[_TimmModel], preset: str) -> Callable[..., nn.Module]:
    """timm's ``variant(pretrained=False, **kwargs)``: ``cls`` with ``arch=preset``."""
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(cls, variant, preset, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = variant
    create.__doc__ = f'{cls.__name__} with arch={preset!r} (see ``default_cfgs[{variant!r}]``).'
    return create


for _variant, (_cls, _preset) in _ENTRYPOINTS.items():
    globals()[_variant] = register_model(_entrypoint(_variant, _cls, _preset))
