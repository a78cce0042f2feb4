"""The plugin's backbones as timm classification models, registered on ``import mmvit_plugins``.

``timm.create_model('boat_cswin_tiny')`` is the dense backbone's trunk plus the public model's
final norm and classifier, so a converted public checkpoint gives the papers' logits (and
``python -m timm validate``-style evaluation); ``features_only=True`` gives the mm backbone's
four maps (strides 4/8/16/32, each after its ``out_norm{i}``) at any input size. Keyword
arguments of ``create_model`` go to the backbone (``arch=dict(...)``, ``drop_path_rate``,
``window_size``, ...). Nothing is ever downloaded: ``pretrained=True`` reads the file named by
the pretrained config, ``pretrained_cfg_overlay=dict(file=path)`` (see ``docs/timm.md``).

Models: ``boat_swin_{tiny,small,base}``, ``boat_cswin_{tiny,small,base}``,
``maformer_{tiny,s,b,l}`` (stage 3 -> ``out_norm3`` = the public final ``norm`` -> global
average pool -> Linear ``head.fc``) and ``refiner_vit_{s,m,l}`` (class token, final ``norm``,
``head`` on the class token plus half the maximum over the patch tokens of ``aux_head``).
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

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
from torch import nn

from .backbones import BOATCSWin, BOATSwin, MAFormer, RefinerViT
from .backbones.base import PyramidBackbone, check_out_indices

__all__ = ['PyramidClassifier', 'RefinerViTClassifier', 'checkpoint_filter_fn']

NUM_STAGES = 4
STAGE_STRIDES = tuple(4 * 2**i for i in range(NUM_STAGES))
_BACKBONE = 'backbone.'
# Parameters the public models exclude from weight decay (Swin's and ViT's no_weight_decay).
_NO_WEIGHT_DECAY = ('relative_position_bias_table', 'pos_embed', 'cls_token')


def _init_linear(module: nn.Module) -> None:
    """The public heads' init: truncated normal (std 0.02) weights, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        nn.init.zeros_(module.bias)


class _TimmModel(nn.Module):
    """What the timm models share: the mm backbone as ``self.backbone`` built with
    ``out_indices`` (its per-stage norms exist only for those stages), ``feature_info`` of all four
    stages, ``forward_intermediates`` (the backbone's maps), pruning for ``features_only`` and
    checkpoint key mapping (see :func:`checkpoint_filter_fn`). Subclasses define the classifier:
    ``forward_features``, ``forward_head``, ``get_classifier`` and ``reset_classifier``."""
    backbone_cls: Type[PyramidBackbone]
    # Top-level (non-backbone) key prefixes of public checkpoints that this model owns.
    head_prefixes: Tuple[str, ...] = ('head.', )

    def _build_backbone(self, in_chans: int, out_indices: Sequence[int], **kwargs) -> None:
        self.stage_indices = check_out_indices(tuple(out_indices), NUM_STAGES)
        self.backbone = self.backbone_cls(in_channels=in_chans, out_indices=self.stage_indices,
                                          **kwargs)
        widths = list(self.backbone.num_features)
        self.feature_info = [
            dict(num_chs=width, reduction=stride, module=f'{_BACKBONE}out_norm{i}')
            for i, (width, stride) in enumerate(zip(widths, STAGE_STRIDES))
        ]
        self.num_features = self.head_hidden_size = widths[-1]

    # -- timm API ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes), or (B, num_features) if
        ``num_classes=0``."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters()
                if name.rsplit('.', 1)[-1] in _NO_WEIGHT_DECAY}

    def _take_indices(self, indices: Union[None, int, Sequence[int]]) -> List[int]:
        """timm's ``indices`` (None: every built stage; n: the last n stages; a sequence)
        -> sorted stage indices, each one the backbone was built to return."""
        if indices is None:
            return list(self.stage_indices)
        if isinstance(indices, int):
            if not 0 < indices <= NUM_STAGES:
                raise ValueError(f'indices={indices} is invalid; allowed values: 1 to '
                                 f'{NUM_STAGES} (the last n stages) or a sequence of stages')
            indices = range(NUM_STAGES - indices, NUM_STAGES)
        take = check_out_indices(tuple(indices), NUM_STAGES)
        missing = sorted(set(take) - set(self.stage_indices))
        if missing:
            raise ValueError(
                f'stages {missing} are not computed: the backbone was built with out_indices='
                f'{self.stage_indices}; create the model with features_only=True and '
                f'out_indices={tuple(take)} (or out_indices=... without features_only)')
        return list(take)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
            norm: bool = True, stop_early: bool = False, output_fmt: str = 'NCHW',
            intermediates_only: bool = False
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """(B, in_chans, H, W) -> the mm backbone's maps (B, C_i, ceil(H/s_i), ceil(W/s_i)),
        s_i = 4 * 2**i, for the stages in ``indices``; with ``forward_features(x)`` first
        unless ``intermediates_only``.

        Every map is its stage's output after the stage's own norm ``out_norm{i}``, as the mm
        backbone returns it, so ``norm`` must be True (pre-norm maps are not exposed by the
        backbones). ``stop_early`` changes nothing: the backbone always runs its stages.
        """
        if not norm:
            raise ValueError('norm=False is not supported: every stage map passes through its '
                             'norm out_norm{i}, as the mm backbone returns it')
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is invalid; allowed values: 'NCHW'")
        take = self._take_indices(indices)
        maps = dict(zip(self.stage_indices, self.backbone(x)))
        intermediates = [maps[i] for i in take]
        if intermediates_only:
            return intermediates
        return self._final_features(x, maps), intermediates

    def _final_features(self, x: torch.Tensor, maps: Dict[int, torch.Tensor]) -> torch.Tensor:
        """``forward_features(x)``, from the stage maps where they hold it (else a second pass:
        Refiner-ViT's tokens are not among its maps)."""
        return self.forward_features(x)

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """For a feature extractor: drop the classifier (``prune_head``), return the stage
        indices. The per-stage norms are part of the stage maps; ``prune_norm`` keeps them."""
        take = self._take_indices(indices)
        if prune_head:
            self.reset_classifier(0, '')
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
    (``backbone.`` prefix removed) goes through the backbone's ``convert_checkpoint``, the only
    copy of the public key rules (e.g. BOAT's public final ``norm`` -> ``out_norm3``). Backbone
    keys public checkpoints never hold (the norms of the other stages, Refiner-ViT's pyramid)
    keep the model's initial values, as the mm backbone's loader leaves them.
    """
    head, trunk = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE):
            trunk[key[len(_BACKBONE):]] = value
        elif key.startswith(model.head_prefixes):
            head[model.head_key(key)] = value
        else:
            trunk[key] = value
    converted = model.backbone.convert_checkpoint(trunk)
    filled = []
    for key, value in model.backbone.state_dict().items():
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
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   input_fmt='NCHW')
        self.head.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the normed last stage map (B, num_features, H/32, W/32)."""
        if self._final_stage not in self.stage_indices:
            raise ValueError(f'the classifier reads stage {self._final_stage}, but the backbone '
                             f'was built with out_indices={self.stage_indices}')
        return self.backbone(x)[-1]

    def _final_features(self, x: torch.Tensor, maps: Dict[int, torch.Tensor]) -> torch.Tensor:
        if self._final_stage in maps:
            return maps[self._final_stage]
        return self.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or pooled (B, C) if ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.apply(_init_linear)

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

    Args:
        num_classes: classes of both heads; 0 for pooled features (``num_features`` wide).
        in_chans: image channels.
        global_pool: ``'token'`` (the class token, as the public model; needs
            ``with_cls_token``) or ``'avg'`` (mean of the normed patch tokens); default the
            former with a class token, else the latter.
        drop_rate: dropout before the heads (the backbone has no dropout).
        return_dense: build ``aux_head`` (as the public ``return_dense``).
        out_indices: pyramid levels the backbone returns (its ``forward``, used by
            ``features_only``); default ``(2,)``, whose norm ``backbone.out_norm2`` is then not
            part of the classifier and is frozen (``requires_grad=False``).
        with_cls_token, global_attn_indexes: the backbone's, defaults as the public classifier
            (a class token, global attention in every block).
        **kwargs: the backbone's other arguments (``arch``, ``drop_path_rate``, ...).
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
        self._build_backbone(in_chans, (self._unused_level, ) if out_indices is None
                             else out_indices, with_cls_token=with_cls_token,
                             global_attn_indexes=global_attn_indexes, **kwargs)
        if out_indices is None:
            self.backbone.get_submodule(f'out_norm{self._unused_level}').requires_grad_(False)
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
                head.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normed tokens of the last block (B, extra + h*w, C), class
        token first."""
        tokens, _ = self.backbone.forward_tokens(x)
        return self.norm(tokens[-1])

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
        """As the base; the final ``norm`` normalises only the heads' input, so it goes with
        the heads."""
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.norm = nn.Identity()
        return take


# -- registration ------------------------------------------------------------------------------
_BOAT_REPO = 'https://github.com/mahaoyuHKU/pytorch-boat'
_REFINER_REPO = 'https://github.com/zhoudaquan/Refiner_ViT'


def _cfg(file: Optional[str] = None, **kwargs) -> dict:
    """A pretrained config that never downloads: no ``url``/``hf_hub_id``; ``file`` is the
    public checkpoint's file name as published (read from the working directory unless
    ``pretrained_cfg_overlay=dict(file=path)``)."""
    return {**dict(url='', hf_hub_id=None, file=file, num_classes=1000,
                   input_size=(3, 224, 224), pool_size=None, interpolation='bicubic',
                   first_conv='backbone.patch_embed.proj', classifier='head.fc'), **kwargs}


def _boat(file: str, link: str, **kwargs) -> dict:
    return _cfg(file, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, license='mit',
                paper_ids='arXiv:2201.13027', origin_url=f'{link} (from {_BOAT_REPO})', **kwargs)


def _refiner(crop_pct: float, **kwargs) -> dict:
    # mean/std 0.5 and the crop of the public default_cfgs
    return _cfg(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=crop_pct,
                first_conv='backbone.patch_embed.conv1', classifier=('head', 'aux_head'),
                paper_ids='arXiv:2106.03714', origin_url=_REFINER_REPO, **kwargs)


def _maformer() -> dict:
    return _cfg(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.9,
                paper_ids='arXiv:2209.01620',
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
        if feature_cls != 'getter' or not feature_cfg.get('norm', True):
            raise ValueError(f"feature_cls={feature_cls!r}, feature_cfg={feature_cfg} are "
                             "invalid; allowed values: feature_cls='getter' with norm=True (the "
                             "backbone's stages are no sequential modules; their maps are "
                             'always normed)')
        out_indices = check_out_indices(kwargs.get('out_indices', tuple(range(NUM_STAGES))),
                                        NUM_STAGES)
        kwargs['out_indices'] = out_indices  # timm's builder moves it to the feature wrapper
        model_cls = partial(cls, out_indices=out_indices)
    feature_cfg.update(feature_cls='getter', norm=True)
    return build_model_with_cfg(model_cls, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


@register_model
def boat_swin_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATSwinClassifier, 'boat_swin_tiny', 'tiny', pretrained, **kwargs)


@register_model
def boat_swin_small(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATSwinClassifier, 'boat_swin_small', 'small', pretrained, **kwargs)


@register_model
def boat_swin_base(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATSwinClassifier, 'boat_swin_base', 'base', pretrained, **kwargs)


@register_model
def boat_cswin_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATCSWinClassifier, 'boat_cswin_tiny', 'tiny', pretrained, **kwargs)


@register_model
def boat_cswin_small(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATCSWinClassifier, 'boat_cswin_small', 'small', pretrained, **kwargs)


@register_model
def boat_cswin_base(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(BOATCSWinClassifier, 'boat_cswin_base', 'base', pretrained, **kwargs)


@register_model
def refiner_vit_s(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(RefinerViTClassifier, 'refiner_vit_s', 'small', pretrained, **kwargs)


@register_model
def refiner_vit_m(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(RefinerViTClassifier, 'refiner_vit_m', 'medium', pretrained, **kwargs)


@register_model
def refiner_vit_l(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(RefinerViTClassifier, 'refiner_vit_l', 'large', pretrained, **kwargs)


@register_model
def maformer_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(MAFormerClassifier, 'maformer_tiny', 'tiny', pretrained, **kwargs)


@register_model
def maformer_s(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(MAFormerClassifier, 'maformer_s', 'small', pretrained, **kwargs)


@register_model
def maformer_b(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(MAFormerClassifier, 'maformer_b', 'base', pretrained, **kwargs)


@register_model
def maformer_l(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(MAFormerClassifier, 'maformer_l', 'large', pretrained, **kwargs)
