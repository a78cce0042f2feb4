"""What the attention of a backbone does in one forward, read by forward hooks.

:class:`AttentionRecorder` hooks the attention blocks of any model that holds them (an mm
backbone, a detector or segmentor, a timm model) and keeps, for the first image of the last
forward, what each block computed: the groups of BOAT's FSLA, the maps entering and leaving
Refiner-ViT's refiners, and the inputs of MAFormer's window and fusion attention. The records
turn a query token into attention weights with :func:`attention_weights`, the weights that
``F.scaled_dot_product_attention`` applies and its fused kernels never materialise. The
forward itself is unchanged: the hooks only read.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmvit_plugins.models.backbones.maformer import MAFBlock
from mmvit_plugins.models.backbones.refiner_vit import RefinedAttention
from mmvit_plugins.models.layers.fsla import FeatureSpaceLocalAttention, GroupLayout
from mmvit_plugins.models.layers.resample import resample_weights
from mmvit_plugins.models.layers.window import pad_to_multiple, window_partition

# block kind -> the module type that has it and what it shows
BLOCK_KINDS = {
    'clusters': 'BOAT FSLA blocks (FeatureSpaceLocalAttention): groups and in-group attention',
    'refiner': 'Refiner-ViT sharing blocks (RefinedAttention with a refiner): maps before/after',
    'window': 'MAFormer MAF blocks (MAFBlock): local window and global tokens',
}


def block_kind(module: nn.Module) -> Optional[str]:
    """The :data:`BLOCK_KINDS` key of an attention block, or None for any other module."""
    if isinstance(module, FeatureSpaceLocalAttention):
        return 'clusters'
    if isinstance(module, RefinedAttention) and module.share:
        return 'refiner'
    if isinstance(module, MAFBlock):
        return 'window'
    return None


def attention_blocks(model: nn.Module) -> Dict[str, str]:
    """Qualified name -> kind of every attention block of ``model``, in forward order."""
    return {name: kind for name, module in model.named_modules()
            if (kind := block_kind(module)) is not None}


def select_blocks(model: nn.Module, blocks: Optional[Sequence[Union[int, str]]] = None,
                  kinds: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The blocks of the given kinds (default: all), narrowed to ``blocks``: names of
    :func:`attention_blocks` or indexes into its list of those kinds.

    Raises:
        ValueError: a kind the model has no block of, or a block that is not one of them;
            the message lists the valid choices.
    """
    available = attention_blocks(model)
    for kind in kinds or ():
        if kind not in BLOCK_KINDS:
            raise ValueError(f'kind {kind!r} is invalid; allowed values: {sorted(BLOCK_KINDS)}')
        if kind not in available.values():
            offered = sorted(set(available.values())) or 'none'
            raise ValueError(f'{kind!r} needs {BLOCK_KINDS[kind]}; this model has none '
                             f'(its attention pictures: {offered})')
    chosen = {name: kind for name, kind in available.items() if not kinds or kind in kinds}
    if blocks is None:
        return chosen
    names = list(chosen)
    selected = {}
    for block in blocks:
        if isinstance(block, int) and -len(names) <= block < len(names):
            name = names[block]
        elif block in chosen:
            name = block
        else:
            listing = ', '.join(f'{i}: {name}' for i, name in enumerate(names))
            raise ValueError(f'block {block!r} is not an attention block of this model; '
                             f'valid choices (index or name): {listing or "none"}')
        selected[name] = chosen[name]
    return selected


def attention_weights(query: torch.Tensor, key: torch.Tensor,
                      attn_mask: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(query @ key^T * scale + attn_mask)`` in float64, as
    ``F.scaled_dot_product_attention`` weighs its values (a boolean mask: True takes part;
    ``scale`` None: ``d ** -0.5``). (..., L, d), (..., S, d) -> (..., L, S)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = query.double() @ key.double().transpose(-2, -1) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float('-inf'))
        else:
            logits = logits + attn_mask.double()
    return logits.softmax(dim=-1)


@dataclass
class AttentionCall:
    """The inputs of one :class:`ScaledDotProductAttention` call, the first image's rows:
    queries (..., L, d), keys (..., S, d), the mask (broadcastable to (..., L, S)) and scale."""
    query: torch.Tensor
    key: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: Optional[float]

    def weights(self, index: Tuple[Any, ...], row: int) -> torch.Tensor:
        """(..., S) weights of query ``row`` of the leading positions ``index``."""
        query = self.query[index][..., row:row + 1, :]
        mask = self.mask
        if mask is not None:
            mask = mask.expand(*self.query.shape[:-1], self.key.shape[-2])[index]
            mask = mask[..., row:row + 1, :]
        return attention_weights(query, self.key[index], mask, self.scale)[..., 0, :]


def _call(args: Tuple, kwargs: Dict[str, Any], rows: Union[int, slice]) -> AttentionCall:
    query, key = args[:2]
    mask = kwargs.get('attn_mask')
    if mask is not None and mask.shape[0] == query.shape[0]:
        mask = mask[rows]
    return AttentionCall(query[rows].detach().clone(), key[rows].detach().clone(),
                         None if mask is None else mask.detach().clone(), kwargs.get('scale'))


def _grid_windows(grid: Tuple[int, int], window: int, device: torch.device) -> torch.Tensor:
    """(num_windows, window ** 2) token (row-major on the grid) at every position of every
    window of one image, as :func:`window_partition` orders them; -1 for padding."""
    h, w = grid
    ids = torch.arange(h * w, device=device, dtype=torch.float64).view(1, h, w, 1)
    return window_partition(pad_to_multiple(ids + 1, window), window)[..., 0].long() - 1


def _window_row(grid: Tuple[int, int], window: int, token: int,
                device: torch.device) -> Tuple[int, int, torch.Tensor]:
    """The window of ``token``, its position in it and the (window ** 2,) tokens of that
    window (-1: padding)."""
    windows = _grid_windows(grid, window, device)
    index, position = (windows == token).nonzero()[0].tolist()
    return index, position, windows[index]


def _on_grid(values: torch.Tensor, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(..., L) values of the ``tokens`` of a window -> (..., h, w), NaN outside the window."""
    out = values.new_full((*values.shape[:-1], grid[0] * grid[1]), float('nan'))
    real = tokens >= 0
    out[..., tokens[real]] = values[..., real]
    return out.view(*values.shape[:-1], *grid)


@dataclass
class ClusterRecord:
    """One FSLA forward, first image: the (h, w) token grid, the clustering's layout and the
    token of every slot per head (None where the map has at most m tokens: one group), and the
    attention call."""
    grid: Tuple[int, int]
    num_heads: int
    layout: Optional[GroupLayout] = None
    order: Optional[torch.Tensor] = None  # (heads, G * slots)
    call: Optional[AttentionCall] = None

    @property
    def num_levels(self) -> int:
        return 0 if self.layout is None else self.layout.shape.num_levels

    def groups(self) -> torch.Tensor:
        """(k, heads, h, w) long: every token's group at levels 1..k of the balanced splits
        (level k: the final groups the attention ran in); (0, heads, h, w) for one group."""
        h, w = self.grid
        if self.layout is None:
            return torch.zeros(0, self.num_heads, h, w, dtype=torch.long,
                               device=self.call.query.device)
        n, order = h * w, self.order
        final = order.new_full((self.num_heads, n + 1), -1)
        slot_group = torch.arange(order.shape[1], device=order.device)
        final.scatter_(1, order, (slot_group // self.layout.shape.group_slots).expand_as(order))
        final = final[:, :n]  # token N collects the padding slots
        k = self.num_levels
        return torch.stack([final >> (k - level) for level in range(1, k + 1)]).view(
            k, self.num_heads, h, w)

    def query_weights(self, token: int) -> torch.Tensor:
        """(heads, h, w) float64: the weight of every token as a key of ``token``'s query (zero
        outside its group and the overlap keys it borrows)."""
        h, w = self.grid
        if self.layout is None:
            return self.call.weights((slice(None), ), token).view(self.num_heads, h, w)
        layout, order = self.layout, self.order
        key_slots = layout.key_slots.view(layout.num_groups, -1)
        out = torch.zeros(self.num_heads, h * w + 1, dtype=torch.float64, device=order.device)
        for head in range(self.num_heads):
            slot = int((order[head] == token).nonzero()[0])
            group, position = divmod(slot, layout.shape.group_slots)
            out[head].index_add_(0, order[head, key_slots[group]],
                                 self.call.weights((head, group), position))
        return out[:, :h * w].view(self.num_heads, h, w)


@dataclass
class RefinerRecord:
    """One sharing Refiner-ViT block's forward, first image: the token grid, the window side
    (0: global), the class tokens before the grid's, and the maps (windows or 1, heads, L, L)
    entering the refiner (``before``) and leaving it (``after``, the map applied)."""
    grid: Tuple[int, int]
    window_size: int
    extra_tokens: int = 0
    before: Optional[torch.Tensor] = None
    after: Optional[torch.Tensor] = None

    def query_maps(self, token: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(heads, h, w) rows of ``token``'s query in the maps before and after the refiner,
        over the grid's keys; NaN outside the query's window."""
        if not self.window_size:
            row = self.extra_tokens + token
            return tuple(m[0, :, row, self.extra_tokens:].reshape(-1, *self.grid)
                         for m in (self.before, self.after))
        index, position, tokens = _window_row(self.grid, self.window_size, token,
                                              self.before.device)
        return tuple(_on_grid(m[index, :, position], tokens, self.grid)
                     for m in (self.before, self.after))


@dataclass
class WindowRecord:
    """One MAF block's forward, first image: the token grid, the window side, the calls of the
    window attention (its windows) and of the fusion attention (queries of the local stream,
    keys of the global tokens), and the GLD."""
    grid: Tuple[int, int]
    window_size: int
    gld: nn.Module
    local: Optional[AttentionCall] = None
    fusion: Optional[AttentionCall] = None

    def local_weights(self, token: int) -> torch.Tensor:
        """(heads, h, w): the window attention of ``token``; NaN outside its window."""
        index, position, tokens = _window_row(self.grid, self.window_size, token,
                                              self.local.query.device)
        return _on_grid(self.local.weights((index, ), position), tokens, self.grid)

    def global_weights(self, token: int) -> torch.Tensor:
        """(heads, M): the fusion attention of ``token`` over the global tokens."""
        return self.fusion.weights((0, ), token)

    def footprints(self) -> torch.Tensor:
        """(M, h, w) float64: how much each global token reads of every token of the map, the
        GLD's token FC pulled back through its resampling to the pretraining grid."""
        gld = self.gld
        weight = gld.token_fc.weight.detach().double().view(-1, *gld.grid_size)
        if tuple(self.grid) == tuple(gld.grid_size):
            return weight
        device = weight.device
        rows = resample_weights(self.grid[0], gld.grid_size[0], gld.resize_mode, device,
                                torch.float64)
        cols = resample_weights(self.grid[1], gld.grid_size[1], gld.resize_mode, device,
                                torch.float64)
        return rows.t() @ weight @ cols


Record = Union[ClusterRecord, RefinerRecord, WindowRecord]


class AttentionRecorder:
    """Context manager: while open, forward hooks on the chosen attention blocks of ``model``
    (see :func:`select_blocks`) keep the first image of every forward in ``records`` (block
    name -> record of the last forward). The hooks read and never change a value.

    >>> with AttentionRecorder(backbone) as recorder:
    ...     backbone(images)
    >>> recorder.records['stages.2.blocks.1.fsla'].groups()
    """

    def __init__(self, model: nn.Module, blocks: Optional[Sequence[Union[int, str]]] = None,
                 kinds: Optional[Sequence[str]] = None):
        self.model = model
        self.selected = select_blocks(model, blocks, kinds)
        self.records: Dict[str, Record] = {}
        self._handles: List[RemovableHandle] = []

    def __enter__(self) -> 'AttentionRecorder':
        modules = dict(self.model.named_modules())
        hook = {'clusters': self._hook_fsla, 'refiner': self._hook_refiner,
                'window': self._hook_maf}
        for name, kind in self.selected.items():
            hook[kind](name, modules[name])
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def _post(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def _hook_fsla(self, name: str, fsla: FeatureSpaceLocalAttention) -> None:
        heads = fsla.num_heads

        def start(_, args):
            self.records[name] = ClusterRecord(tuple(args[1]), heads)

        def clustered(_, args, order):
            record = self.records[name]
            record.layout, record.order = args[1], order[:heads].detach().clone()

        def attended(_, args, kwargs, out):
            record = self.records[name]
            # grouped: the first image's rows of (B * heads, G, s, d); one group: (B, heads, N, d)
            record.call = _call(args, kwargs, slice(0, heads) if record.layout is not None else 0)

        self._pre(fsla, start)
        self._post(fsla.clustering, clustered)
        self._post(fsla.sdpa, attended, with_kwargs=True)

    def _hook_refiner(self, name: str, attn: RefinedAttention) -> None:
        def start(_, args):
            x, prev, grid = args
            record = RefinerRecord(tuple(grid), attn.window_size,
                                   x.shape[1] - grid[0] * grid[1] if not attn.window_size else 0)
            record.before = prev[:len(prev) // len(x)].detach().clone()
            self.records[name] = record

        def applied(_, args, out):
            record = self.records[name]
            record.after = out[:len(record.before)].detach().clone()

        self._pre(attn, start)
        self._post(attn.attn_map, applied)

    def _hook_maf(self, name: str, block: MAFBlock) -> None:
        batch = []

        def start(_, args):
            batch[:] = [args[0].shape[0]]
            self.records[name] = WindowRecord(tuple(args[0].shape[1:3]),
                                              block.local_attn.window_size, block.gld)

        def local(_, args, kwargs, out):
            self.records[name].local = _call(args, kwargs, slice(0, len(args[0]) // batch[0]))

        def fusion(_, args, kwargs, out):
            self.records[name].fusion = _call(args, kwargs, slice(0, 1))

        self._pre(block, start)
        self._post(block.local_attn.attn.sdpa, local, with_kwargs=True)
        self._post(block.fusion_attn.sdpa, fusion, with_kwargs=True)
