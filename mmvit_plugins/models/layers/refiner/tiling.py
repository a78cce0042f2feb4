"""How the refiner's fused paths tile the attention maps: chunks of query rows (sized by one
:class:`ChunkPolicy`), reused chunk buffers (:class:`Workspace`) and the pieces of padded-window
maps that hold more than constants (:class:`MapPiece`, :func:`padded_window_layout`)."""
import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..policy import (
    CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS,
    SCATTER_PER_WINDOW_ON,
    Size,
    capturing,
)
from ..shapes import size_cache

# ``(r0, r1, i0, i1)``: the rows [r0, r1) of a chunk and the rows [i0, i1) a kernel reads for them.
RowChunk = Tuple[Size, Size, Size, Size]


class Tiling(NamedTuple):
    """A :class:`ChunkPolicy` resolved for one device: what the refiner's passes run with."""
    # elements of the expanded maps per chunk; None: one chunk of the whole maps
    chunk_elements: Optional[int]
    # the fewest query rows per chunk
    min_rows: int
    # whether a piece of the padded-window maps is written back with one operation per window
    scatter_per_window: bool

    def rows_per_chunk(self, row_elements: int) -> Optional[int]:
        """Rows per chunk when one row of the expanded maps has ``row_elements`` elements; at
        least ``min_rows``: the depthwise conv's halo is recomputed for every chunk (2 rows for a
        3x3 kernel), which would outweigh what small chunks gain in the caches (many windows in
        a batch make rows long)."""
        if self.chunk_elements is None:
            return None
        return max(self.chunk_elements // row_elements, self.min_rows)

    def row_chunks(self, num_rows: Size, row_elements: int,
                   halo: Tuple[int, int]) -> List[RowChunk]:
        """``(r0, r1, i0, i1)`` of every chunk of ``num_rows`` rows of ``row_elements`` expanded
        elements each (one chunk of all rows when unchunked, with no loop over a symbolic size):
        its rows [r0, r1) and the rows [i0, i1) that a kernel with ``halo = (top, bottom)`` reads
        for them."""
        rows = self.rows_per_chunk(row_elements)
        if rows is None:
            return [(0, num_rows, 0, num_rows)]
        top, bottom = halo
        return [(r0, min(r0 + rows, num_rows), max(r0 - top, 0),
                 min(r0 + rows + bottom, num_rows)) for r0 in range(0, num_rows, rows)]

    def workspace(self, like: torch.Tensor) -> 'Workspace':
        """Chunk buffers of ``like``'s dtype and device, disabled for one whole-map chunk."""
        return Workspace(like, self.chunk_elements is not None)


@dataclass(frozen=True)
class ChunkPolicy:
    """How large the chunks of the refiner's fused paths are, per device type. The defaults
    and the measurements behind them are in :mod:`..policy` (``CHUNK_ELEMENTS``)."""
    chunk_elements: Dict[str, int] = field(default_factory=lambda: dict(CHUNK_ELEMENTS))
    default_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    min_rows: int = 16
    scatter_per_window_on: Tuple[str, ...] = SCATTER_PER_WINDOW_ON

    def tiling(self, device: torch.device) -> Tiling:
        """The tiling on ``device``: one chunk while a graph is captured (a chunk count that
        follows the map size would freeze the size into the graph, whose compiler fuses these
        steps anyway)."""
        elements = None if capturing() else self.chunk_elements.get(
            device.type, self.default_chunk_elements)
        return Tiling(elements, self.min_rows, device.type in self.scatter_per_window_on)


DEFAULT_CHUNK_POLICY = ChunkPolicy()


class Workspace:
    """Buffers that the chunks of the refiner's passes reuse (``out=``): on the CPU a fresh
    chunk-sized tensor costs a page fault per 4 KB, more than the arithmetic on it. Disabled
    (every request None: the ops allocate) for one whole-map chunk, e.g. while a graph is
    captured."""

    def __init__(self, like: torch.Tensor, enabled: bool):
        self.like, self.enabled = like, enabled
        self.buffers: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> Optional[torch.Tensor]:
        """A contiguous ``shape`` view of buffer ``name`` (grown when too small)."""
        if not self.enabled:
            return None
        size = math.prod(shape)
        if name not in self.buffers or self.buffers[name].numel() < size:
            self.buffers[name] = self.like.new_empty(size)
        return self.buffers[name][:size].view(shape)


class MapPiece:
    """Some of the batch's (B, C, L, L) maps, ``windows`` (None: all), restricted to the query
    and key tokens ``tokens`` (None: all): gathered to (B', C, T, T). Built from Python ints
    (no tensor is read to find the pieces, nor to scatter them back)."""

    def __init__(self, windows: Optional[List[int]] = None, tokens: Optional[List[int]] = None,
                 size: int = 0, device: Optional[torch.device] = None):
        self.window_list = windows
        self.windows = None if windows is None else torch.tensor(windows, device=device)
        self.num_tokens = None if tokens is None else len(tokens)
        index = None if tokens is None else torch.tensor(tokens, device=device)
        # the entries' indices in the flattened size x size maps
        self.entries = None if index is None else (index[:, None] * size + index).flatten()
        self.whole = windows is None and tokens is None
        self._flat_indices: Dict[Tuple[int, ...], torch.Tensor] = {}

    def _flat_index(self, full: torch.Tensor) -> torch.Tensor:
        """The indices of the piece's entries in ``full.view(-1)``, in the order of the gathered
        (B', C, T, T) values: (B' * C * T * T,), cached per shape of ``full``."""
        shape = tuple(full.shape)
        if shape not in self._flat_indices:
            b, c = shape[:2]
            windows = torch.arange(b, device=full.device) if self.windows is None \
                else self.windows
            maps = windows[:, None] * c + torch.arange(c, device=full.device)
            self._flat_indices[shape] = (maps[:, :, None] * shape[2] * shape[3]
                                         + self.entries).flatten()
        return self._flat_indices[shape]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The piece of (B, C, L, L) maps ``t``: (B', C, T, T)."""
        if self.windows is not None:
            t = t.index_select(0, self.windows)
        if self.entries is not None:
            t = t.flatten(2).index_select(2, self.entries).view(
                *t.shape[:2], self.num_tokens, self.num_tokens)
        return t

    def scatter_(self, full: torch.Tensor, values: torch.Tensor, tiling: Tiling,
                 accumulate: bool = False) -> torch.Tensor:
        """``full`` at the piece's entries set to (``accumulate``: plus) ``values``, one
        operation per window where ``tiling.scatter_per_window``."""
        if self.entries is None:
            fn = full.index_add_ if accumulate else full.index_copy_
            return fn(0, self.windows, values)
        if tiling.scatter_per_window:
            flat, values = full.flatten(2), values.flatten(2)
            windows = range(len(full)) if self.window_list is None else self.window_list
            for i, w in enumerate(windows):
                fn = flat[w].index_add_ if accumulate else flat[w].index_copy_
                fn(1, self.entries, values[i])
            return full
        flat = full.view(-1)
        fn = flat.index_add_ if accumulate else flat.index_copy_
        fn(0, self._flat_index(full), values.reshape(-1))
        return full


class MapLayout(NamedTuple):
    """The pieces of the maps that the expanded steps compute, and the number of map entries
    (per head) outside them, where the expanded maps are constants."""
    pieces: Tuple[MapPiece, ...]
    far: int


WHOLE_MAPS = MapLayout((MapPiece(), ), 0)


class PieceMaps(NamedTuple):
    """A piece, its map (B', H, R, K), its float mask (B', 1, R, K) or None, and its chunks of
    query rows with the rows that the depthwise conv reads for them."""
    piece: MapPiece
    attn: torch.Tensor
    keep: Optional[torch.Tensor]
    chunks: List[RowChunk]


@size_cache(maxsize=32)
def padded_window_layout(hw: Tuple[int, int], window: int, num_maps: int, pad: int,
                         device: torch.device) -> MapLayout:
    """The pieces of ``num_maps`` (B * windows, H, L, L) attention maps of the windows of B
    (h, w) token grids padded to whole ``window`` x ``window`` windows (``window_partition``'s
    order, masked by ``window_padding_mask``) that the refiner's expanded steps compute.

    The expanded maps are zeroed at padding queries and keys before the depthwise conv (``pad``
    rows and columns each side), so that they are the same per-channel constants at every entry
    more than ``pad`` rows or columns away from a real query and key: the windows are grouped by
    their real extent and restricted to the tokens within that reach of real ones. The gathered
    maps stay adjacent where it matters: a token within reach whose neighbour is not has, in the
    gathered order, a padding neighbour, zero like the conv's own padding. The whole maps when
    nothing would be spared but a tenth of the entries. From sizes only: no tensor is read.
    """
    h, w = hw
    size = window * window
    extents = [(min(window, h - y), min(window, w - x))
               for y in range(0, h, window) for x in range(0, w, window)]
    batch = num_maps // len(extents)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, extent in enumerate(extents):
        groups.setdefault(extent, []).append(i)
    total = batch * len(extents) * size * size
    reaches = {}
    for rows, cols in groups:
        real = {r * window + c for r in range(rows) for c in range(cols)}
        reaches[rows, cols] = sorted({t + d for t in real for d in range(-pad, pad + 1)
                                      if 0 <= t + d < size})
    entries = {extent: batch * len(groups[extent]) * len(reach) ** 2
               for extent, reach in reaches.items()}
    if sum(entries.values()) > 0.9 * total:
        return WHOLE_MAPS
    pieces = []
    for extent in sorted(groups, key=entries.__getitem__, reverse=True):
        windows = None if len(groups) == 1 else [
            b * len(extents) + i for b in range(batch) for i in groups[extent]]
        tokens = None if len(reaches[extent]) == size else reaches[extent]
        pieces.append(MapPiece(windows, tokens, size, device))
    return MapLayout(tuple(pieces), total - sum(entries.values()))


def piece_maps(attn: torch.Tensor, keep: Optional[torch.Tensor], pieces: Sequence[MapPiece],
               expanded: int, halo: Tuple[int, int], tiling: Tiling) -> List[PieceMaps]:
    """Per piece of ``attn`` (B, H, L, L): its map, its gathered float mask (``keep``,
    (B, 1, L, L)) and the chunks of its query rows with the rows that the depthwise conv
    (``halo`` rows above and below) reads; ``expanded`` channels of the expanded maps."""
    out = []
    for piece in pieces:
        a_p = piece.gather(attn)
        b, _, r, k = a_p.shape
        out.append(PieceMaps(piece, a_p, None if keep is None else piece.gather(keep),
                             tiling.row_chunks(r, b * expanded * k, halo)))
    return out


def map_chunks(attn: torch.Tensor, expanded: int, tiling: Tiling) -> List[Tuple[Size, Size]]:
    """Query-row chunks [r0, r1) of the map-sized steps on the whole (B, H, L, L) map."""
    b, _, n, _ = attn.shape
    return [(r0, r1) for r0, r1, _, _ in tiling.row_chunks(n, b * expanded * n, (0, 0))]
