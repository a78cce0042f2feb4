"""What every backbone of the plugin shares: the argument checks, pretrained loading, freezing,
the weight init, the per-output norms, activation checkpointing and the stage loop."""
import math
import numbers
from contextlib import contextmanager, nullcontext
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger, print_log
from mmengine.model import BaseModule
from timm.layers import calculate_drop_path_rates, trunc_normal_
from torch import nn

from mmvit_plugins.checkpoint import (
    KeyLayout,
    extract_state_dict,
    load_checkpoint_file,
    load_state_dict_report,
)
from mmvit_plugins.models.layers.policy import capturing, has_rng_state, output_dtype
from mmvit_plugins.models.layers.pyramid import PYRAMID_STRIDES
from mmvit_plugins.models.layers.shapes import contains
from mmvit_plugins.models.layers.window import window_attention_mask


# -- argument checks: every backbone speaks this one vocabulary ------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: Optional[int] = None,
              high: Optional[int] = None) -> int:
    """An int (never a bool) in [low, high]; either bound may be None."""
    if not is_int(value) or (low is not None and value < low) or \
            (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f'ints in [{low}, {high}]'
        elif low is not None:
            allowed = f'ints >= {low}'
        else:
            allowed = 'ints'
        raise ValueError(f'{name}={value!r} is invalid; allowed values: {allowed}')
    return int(value)


def check_number(name: str, value: Any, low: float, high: float,
                 include_low: bool = True, include_high: bool = True) -> float:
    """A real number (never a bool) in the interval from low to high."""
    ok = _is_number(value) and (low <= value if include_low else low < value) and \
        (value <= high if include_high else value < high)
    if not ok:
        interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise ValueError(f'{name}={value!r} is invalid; allowed values: numbers in {interval}')
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """A dropout / drop-path probability: [0, 1), since 1 would zero (and mmcv/timm would
    divide by) the kept fraction."""
    return check_number(name, value, 0., 1., include_high=False)


def check_block_options(mlp_ratio: float, drop_rate: float, drop_path_rate: float,
                        attn_drop_rate: float = 0.) -> None:
    """The transformer-block options every backbone takes."""
    check_number('mlp_ratio', mlp_ratio, 0., math.inf, include_low=False, include_high=False)
    check_probability('drop_rate', drop_rate)
    check_probability('attn_drop_rate', attn_drop_rate)
    check_probability('drop_path_rate', drop_path_rate)


def check_choice(name: str, value: Any, choices: Sequence) -> Any:
    if value not in choices:
        raise ValueError(f'{name}={value!r} is invalid; allowed values: {tuple(choices)}')
    return value


def check_ints(name: str, values: Any, length: int, low: int = 1) -> Tuple[int, ...]:
    """A sequence of ``length`` ints (never bools), each >= low."""
    if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence)
            or len(values) != length or not all(is_int(v) and v >= low for v in values)):
        raise ValueError(f'{name}={values!r} is invalid; allowed values: {length} ints >= {low}')
    return tuple(int(v) for v in values)


def check_indices(name: str, indices: Any, num: int, what: str = 'index',
                  allow_empty: bool = False, unique: bool = True) -> Tuple[int, ...]:
    """An int or a sequence of ints in [-num, num), normalised to [0, num) in the given order;
    non-empty and without duplicates unless allowed."""
    if is_int(indices):
        indices = (indices, )
    if (isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence)
            or not (indices or allow_empty)
            or not all(is_int(i) and -num <= i < num for i in indices)):
        amount = 'a sequence' if allow_empty else 'a non-empty sequence'
        raise ValueError(f'{name}={indices!r} is invalid; allowed values: {amount} of {what} '
                         f'ints in [{-num}, {num - 1}]')
    normalised = tuple(int(i) % num for i in indices)
    if unique and len(set(normalised)) != len(normalised):
        raise ValueError(f'{name}={tuple(indices)} is invalid: it holds duplicates')
    return normalised


def check_out_indices(out_indices: Any, num_outputs: int = 4) -> Tuple[int, ...]:
    """``out_indices``: distinct output indices (negative allowed), sorted, in [0, num)."""
    return tuple(sorted(check_indices('out_indices', out_indices, num_outputs, 'output')))


def check_heads(widths: Sequence[int], heads: Sequence[int], name: str = 'num_heads') -> None:
    """Every stage width must split evenly into its heads."""
    for stage, (width, num_heads) in enumerate(zip(widths, heads)):
        if num_heads <= 0 or width % num_heads:
            raise ValueError(f'{name}[{stage}]={num_heads} does not divide the width {width} '
                             f'of stage {stage}; allowed values: divisors of {width}')


def resolve_arch(arch: Union[str, Mapping], arch_zoo: Mapping[str, Mapping],
                 required_keys: Iterable[str]) -> dict:
    """An arch preset by name (aliases allowed), or a custom dict holding every required key."""
    required = set(required_keys)
    if isinstance(arch, str):
        if arch.lower() not in arch_zoo:
            raise ValueError(f'arch={arch!r} is not a preset; allowed values: '
                             f'{sorted(arch_zoo)} or a dict with keys {sorted(required)}')
        return dict(arch_zoo[arch.lower()])
    if not isinstance(arch, Mapping):
        raise ValueError(f'arch must be a preset name or a dict, got {type(arch).__name__}')
    missing = required - set(arch)
    if missing:
        raise ValueError(f'custom arch is missing keys {sorted(missing)}; '
                         f'a custom arch needs {sorted(required)}')
    return dict(arch)


def check_pyramid_arch(arch: Mapping, extra_keys: Sequence[str] = ()) -> List[int]:
    """``embed_dims`` C and 4-stage ``depths``/``num_heads`` (and ``extra_keys``) of a resolved
    hierarchical arch; returns the stage widths (C, 2C, 4C, 8C)."""
    embed_dims = check_int("arch['embed_dims']", arch['embed_dims'], low=1)
    for key in ('depths', 'num_heads') + tuple(extra_keys):
        check_ints(f'arch[{key!r}]', arch[key], 4)
    widths = [embed_dims * 2**i for i in range(4)]
    check_heads(widths, arch['num_heads'])
    return widths


def check_input(x: Any, in_channels: int, dtype: torch.dtype) -> None:
    """Images must come as (B, in_channels, H, W) floats of the model's dtype, B, H, W > 0."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'input must be a 4-D tensor (B, C, H, W), got {shape}')
    if x.shape[1] != in_channels:
        raise ValueError(f'input has {x.shape[1]} channels, the backbone was built with '
                         f'in_channels={in_channels}')
    if 0 in x.shape:
        raise ValueError(f'input has an empty dimension: {tuple(x.shape)}')
    if x.dtype != dtype:
        raise TypeError(f'input has dtype {x.dtype}, the backbone computes in {dtype}: pass '
                        f'floating-point images of dtype {dtype} (e.g. x.to({dtype})), or cast '
                        'the model; for mixed precision keep the model in float32 and use '
                        'torch.autocast')


def drop_path_rates(rate: float, num_blocks: int) -> List[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (timm's rule)."""
    return calculate_drop_path_rates(rate, num_blocks)


def init_linear_and_norm(module: nn.Module) -> None:
    """The public models' init: truncated-normal Linear (std .02, zero bias), unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- activation checkpointing -----------------------------------------------------------------
@contextmanager
def _recomputation(module: nn.Module) -> Iterator[None]:
    """The backward's recomputation of ``module``: the buffers of its BatchNorms (running
    statistics, batch counts) are restored afterwards, whatever updated them (a BatchNorm's
    own forward, the refiner's statistics update), so that they move once per forward."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved):
                for buffer, value in zip(norm.buffers(recurse=False), buffers):
                    buffer.copy_(value)


def checkpoint(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` with its activations recomputed in the backward (torch's non-reentrant
    checkpoint), free of effects in the recomputation (:func:`_recomputation`). A captured
    graph is recomputed by its compiler, which replays no effect. ``args[0]`` is a tensor on
    the device the module runs on."""
    rng = has_rng_state(args[0].device)
    if capturing():
        return cp.checkpoint(module, *args, use_reentrant=False, preserve_rng_state=rng)
    return cp.checkpoint(module, *args, use_reentrant=False, preserve_rng_state=rng,
                         context_fn=lambda: (nullcontext(), _recomputation(module)))


# -- stages ---------------------------------------------------------------------------------
class Stage(nn.Module):
    """The blocks of one stage on (B, H, W, C) maps, with an optional downsampling before them
    (``downsample_first``, MAFormer) or after them (BOAT).

    ``forward(x) -> (stage output, input of the next stage)``. ``block_args(x)`` gives each
    block's extra forward arguments for the map its blocks see (e.g. window masks, computed
    once per stage).
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None,
                 downsample_first: bool = False, with_cp: bool = False):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.downsample_first = downsample_first
        self.with_cp = with_cp

    def block_args(self, x: torch.Tensor) -> Sequence[tuple]:
        return [()] * len(self.blocks)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.downsample is not None and self.downsample_first:
            x = self.downsample(x)
        for block, args in zip(self.blocks, self.block_args(x)):
            if self.with_cp and x.requires_grad:
                x = checkpoint(block, x, *args)
            else:
                x = block(x, *args)
        if self.downsample is None or self.downsample_first:
            return x, x
        return x, self.downsample(x)


class WindowStage(Stage):
    """A stage whose blocks attend in ``window_size`` windows (BOAT-Swin, MAFormer's MAF stages).

    Blocks with ``shifted=True`` roll the map by half a window when it is larger than one
    window; the :func:`window_attention_mask` of each shift is built once per stage.
    """

    def __init__(self, blocks: Sequence[nn.Module], window_size: int,
                 downsample: Optional[nn.Module] = None, downsample_first: bool = False,
                 with_cp: bool = False):
        super().__init__(blocks, downsample, downsample_first, with_cp)
        self.window_size = window_size

    def block_args(self, x: torch.Tensor) -> List[Tuple[int, Optional[torch.Tensor]]]:
        """(shift size, attention mask) of every block."""
        hw = x.shape[1:3]
        # not max(hw): with dynamic shapes it would guard on which side is longer
        larger = hw[0] > self.window_size or hw[1] > self.window_size
        shift = self.window_size // 2 if larger else 0
        # keyed by the flag: a dict key cannot be a SymInt
        masks: Dict[bool, Optional[torch.Tensor]] = {}
        args = []
        for block in self.blocks:
            size = shift if block.shifted else 0
            if block.shifted not in masks:
                masks[block.shifted] = window_attention_mask(hw, self.window_size, size, x.device)
            args.append((size, masks[block.shifted]))
        return args


# -- the backbone ---------------------------------------------------------------------------
class PyramidBackbone(BaseModule):
    """Base of the plugin's backbones.

    It holds the common arguments (checked), pretrained loading through ``convert_checkpoint``
    with a report of unmatched keys, freezing (from construction on, so that DDP never registers
    frozen parameters as trained; frozen parts stay in eval mode in ``train()``), the per-output
    norms ``out_norm{i}`` and, for hierarchical backbones, the forward: ``patch_embed`` (image ->
    (B, H/4, W/4, C)), ``embed_drop``, then ``stages`` (:class:`Stage`), each returned output
    after its norm, as NCHW.

    Only what feeds an output is built: the stages up to the last one in ``out_indices``
    (``num_stages`` of them), without the downsampling after the last one, and the output norms
    of ``out_indices``. Every parameter of the model then gets a gradient, so that DDP trains
    with ``find_unused_parameters=False`` (mm configs' default) for any ``out_indices``, and
    nothing is computed or kept for outputs nobody reads. (mmdet's Swin builds and runs every
    stage: with ``out_indices=(0, 1, 2)`` its last stage gets no gradient and DDP stops at the
    second iteration unless unused parameters are searched for every iteration.) A checkpoint
    of the whole model loads: the keys of the parts not built are left out, with an info
    message (:meth:`loadable_state_dict`).

    A subclass builds its modules, then calls :meth:`_finish_init`. By default frozen stage k
    means the stem, stages 0..k-1 and their output norms (mmdet's Swin); a subclass with another
    layout overrides :meth:`_frozen_modules`. ``norm_eval`` is an argument only of backbones
    with BatchNorm layers (RefinerViT).
    """
    # Prefixes of the keys public checkpoints never hold (left at their initial values).
    _keys_not_in_public_checkpoints: Tuple[str, ...] = ('out_norm',)
    # How this family's checkpoint keys look (public release, converted), to tell families apart.
    checkpoint_layouts: Tuple[KeyLayout, ...] = ()
    norm_eval: bool = False

    def __init__(self, in_channels: int, out_indices: Union[int, Sequence[int]],
                 frozen_stages: int, num_frozen_units: int = 4, with_cp: bool = False,
                 use_ema: bool = False, init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(init_cfg=init_cfg)
        self.in_channels = check_int('in_channels', in_channels, low=1)
        self.out_indices = check_out_indices(out_indices, len(PYRAMID_STRIDES))
        self.frozen_stages = check_int('frozen_stages', frozen_stages, -1, num_frozen_units)
        self.with_cp = bool(with_cp)
        self.use_ema = bool(use_ema)
        self.num_stages = self.out_indices[-1] + 1

    def _add_out_norms(self, widths: Sequence[int],
                       norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        for i in self.out_indices:
            self.add_module(f'out_norm{i}', norm_layer(widths[i]))

    def _finish_init(self) -> None:
        """Initialise the weights and freeze; the last step of every subclass constructor."""
        self.apply(init_linear_and_norm)
        self._init_extra_weights()
        self._freeze_stages()

    def _init_extra_weights(self) -> None:
        """Parameters outside Linear/LayerNorm layers (position embeddings, class tokens)."""

    # -- pretrained weights -----------------------------------------------------------------
    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map a public checkpoint's keys/tensors onto this module's. Identity by default."""
        return state_dict

    def unbuilt_key_prefixes(self) -> Tuple[str, ...]:
        """Key prefixes (converted) of what the whole model has and ``out_indices`` leaves
        unbuilt: the other output norms and the stages after the last output."""
        return tuple([f'out_norm{i}.' for i in range(len(PYRAMID_STRIDES))
                      if i not in self.out_indices] +
                     [f'stages.{i}.' for i in range(self.num_stages, len(PYRAMID_STRIDES))])

    def loadable_state_dict(self, state_dict: Dict[str, torch.Tensor]
                            ) -> Dict[str, torch.Tensor]:
        """:meth:`convert_checkpoint`, less the keys of the parts not built (an info message
        counts them): what loading a checkpoint of the whole model into this one takes."""
        converted = self.convert_checkpoint(state_dict)
        prefixes = self.unbuilt_key_prefixes()
        unbuilt = [k for k in converted if k.startswith(prefixes)]
        if unbuilt:
            parts = sorted({p.rstrip('.') for p in prefixes for k in unbuilt if k.startswith(p)})
            print_log(f'{type(self).__name__}: out_indices={self.out_indices} leaves {parts} '
                      f'unbuilt: their {len(unbuilt)} checkpoint tensors are not loaded',
                      logger='current')
        return {k: v for k, v in converted.items() if not k.startswith(prefixes)}

    def init_weights(self) -> None:
        """Initialise, or load ``init_cfg=dict(type='Pretrained', checkpoint=...)``.

        The init_cfg may also hold ``prefix`` (take the keys under it), ``map_location`` and
        ``trust_checkpoint``. The checkpoint is read with the safe loader of
        ``mmvit_plugins.checkpoint`` (tensors and plain containers);
        ``trust_checkpoint=True`` unpickles everything, which runs whatever code the file
        names: only for a file you trust. Raises a ValueError naming the checkpoint and the
        family its keys look like when fewer than half of the tensors load.
        """
        pretrained = isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'
        if not pretrained:
            super().init_weights()
            self._freeze_stages()
            return
        allowed = ('type', 'checkpoint', 'prefix', 'map_location', 'trust_checkpoint')
        unknown = sorted(set(self.init_cfg) - set(allowed))
        if unknown:
            raise ValueError(f"init_cfg=dict(type='Pretrained') got unknown keys {unknown}; "
                             f'allowed keys: {list(allowed)}')
        checkpoint = self.init_cfg.get('checkpoint')
        if not checkpoint:
            raise ValueError("init_cfg=dict(type='Pretrained') needs checkpoint=<path or URL>")
        trust = self.init_cfg.get('trust_checkpoint', False)
        if not isinstance(trust, bool):
            raise ValueError(f'init_cfg trust_checkpoint={trust!r} is invalid; allowed values: '
                             'True, False')
        logger = MMLogger.get_current_instance()
        loaded = load_checkpoint_file(checkpoint, self.init_cfg.get('map_location', 'cpu'),
                                      trust=trust)
        state = extract_state_dict(loaded, use_ema=self.use_ema,
                                   prefix=self.init_cfg.get('prefix'), name=checkpoint,
                                   logger=logger)
        self.load_report = load_state_dict_report(
            self, state, ignore_missing=self._keys_not_in_public_checkpoints, logger=logger,
            checkpoint=checkpoint, convert=self.loadable_state_dict, min_loaded=0.5)
        self._is_init = True
        self._freeze_stages()

    # -- freezing ----------------------------------------------------------------------------
    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """Modules (and parameters wrapped in modules) frozen for ``frozen_stages``."""
        modules = [self.patch_embed] if frozen_stages >= 0 else []
        for i in range(min(frozen_stages, len(self.stages))):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'out_norm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        """``requires_grad=False`` and eval mode for the frozen parts."""
        if self.frozen_stages < 0:
            return
        for module in self._frozen_modules(self.frozen_stages):
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'PyramidBackbone':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # -- forward -----------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_channels, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> one (B, num_features[i], ceil(H / s), ceil(W / s)) map
        per ``out_indices`` entry, s = 4 * 2**i, all in one dtype (autocast's under it)."""
        self.check_input(x)
        dtype = output_dtype(x)
        return tuple(self.stage_map(i, out, dtype)
                     for i, out in self.stage_outputs(x, self.out_indices))

    def stage_outputs(self, x: torch.Tensor, indices: Sequence[int],
                      stop: Optional[int] = None) -> List[Tuple[int, torch.Tensor]]:
        """(B, in_channels, H, W) -> ``(i, stage i's (B, h, w, C) output)`` for the stages in
        ``indices``, running the stages up to ``stop`` (inclusive; None: all built)."""
        x = self.embed_drop(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.stages):
            if stop is not None and i > stop:
                break
            out, x = stage(x)
            if contains(indices, i):
                outs.append((i, out))
        return outs

    def stage_map(self, i: int, out: torch.Tensor, dtype: torch.dtype,
                  norm: bool = True) -> torch.Tensor:
        """Stage ``i``'s (B, h, w, C) output -> (B, C, h, w) of ``dtype``, through
        ``out_norm{i}`` if ``norm`` and the backbone has it."""
        if norm and hasattr(self, f'out_norm{i}'):
            out = getattr(self, f'out_norm{i}')(out)
        return out.permute(0, 3, 1, 2).contiguous().to(dtype)


def stage_rates(rate: float, depths: Sequence[int]) -> List[List[float]]:
    """:func:`drop_path_rates` over all blocks, split per stage."""
    return calculate_drop_path_rates(rate, list(depths), stagewise=True)
