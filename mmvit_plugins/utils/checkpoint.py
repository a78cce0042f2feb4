"""Reading checkpoints safely, taking the weights out of every public layout, and loading them
with a report of what did not match.

Every checkpoint is treated as hostile. It is read with ``torch.load(weights_only=True)``, which
builds tensors and plain containers only; the globals in ``safe_globals()`` (numpy values and
arrays, ``argparse.Namespace``, sets, mmengine's ``HistoryBuffer``) are allow-listed for the
duration of the load and nothing else, so public checkpoints and mmengine's training checkpoints
(message hub, optimizer, schedulers) load, and a file whose pickle names anything else is refused
with an ``UnsafeCheckpointError`` naming the file and the global. Loading such a file anyway is an
explicit choice per file (``trust=True``: ``trust_checkpoint=True`` in a backbone's ``init_cfg``,
``--trust-checkpoint`` for the tools).

torch versions: >= 2.4 as above (the allow-list is added to torch's list for the load and the
previous list is restored afterwards); 1.13-2.3 (``weights_only`` without an extensible
allow-list) load tensors and plain containers only and refuse anything else, saying that torch
>= 2.4 would allow-list it; < 1.13 has no safe loader, so only trusted files load there.
"""
import argparse
import codecs
import hashlib
import inspect
import logging
import os
import os.path as osp
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from io import BytesIO
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from mmengine.logging import MMLogger, print_log
from torch import nn

Logger = Union[MMLogger, str]

TRUST_HINT = ('only if you trust the file and where it came from, load it with full unpickling: '
              "init_cfg=dict(type='Pretrained', checkpoint=..., trust_checkpoint=True) for a "
              'backbone of mmvit_plugins, --trust-checkpoint for tools/train.py (--resume, '
              'load_from), tools/test.py and tools/model_converters/*.py')

# Containers the public releases use: timm-style training checkpoints (.pth.tar) carry
# 'state_dict' and often 'state_dict_ema' (or only that); DeiT/Swin-style .pth carry 'model' (and
# 'model_ema'); OpenMMLab checkpoints carry 'state_dict'.
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_CONTAINER_KEYS = ('model', 'state_dict', 'module')
_WRAPPER_PREFIX = 'module.'
_BACKBONE_PREFIX = 'backbone.'

_TORCH_HAS_WEIGHTS_ONLY = 'weights_only' in inspect.signature(torch.load).parameters
_TORCH_HAS_SAFE_GLOBALS = hasattr(torch.serialization, 'add_safe_globals')
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a pickle global outside the safe loader's allow-list."""


# -- the allow-list --------------------------------------------------------------------------
def _renamed(func: Callable, module: str, name: str) -> Callable:
    """``func`` under another import path: torch finds user globals by module and name."""

    def alias(*args):
        return func(*args)

    alias.__module__, alias.__name__, alias.__qualname__ = module, name, name
    return alias


def _history_buffer_getattr(owner: Any, name: str) -> Any:
    """The ``getattr`` that a pickled mmengine ``HistoryBuffer`` calls to name its statistics
    methods (``HistoryBuffer.min`` ...), limited to them: a free ``getattr`` reaches any
    attribute of any allowed object, and through them any module."""
    from mmengine.logging import HistoryBuffer
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    owner_name = getattr(owner, '__qualname__', type(owner).__name__)
    raise UnsafeCheckpointError(
        f'Unsupported global: GLOBAL builtins.getattr({owner_name},{name!r}) (only the '
        'statistics methods of HistoryBuffer are allowed)')


def safe_globals() -> List[Callable]:
    """What ``torch.load(weights_only=True)`` may build besides tensors and plain containers.

    ``_codecs.encode`` (how protocol-2 pickles store bytes; torch < 2.5 lacks it), numpy
    scalars, dtypes and arrays (under numpy 1.x's and 2.x's module paths, so a checkpoint
    written with either loads), ``argparse.Namespace`` (the ``args`` of timm/DeiT checkpoints),
    ``set``/``frozenset``, and mmengine's ``HistoryBuffer`` with the restricted ``getattr`` its
    pickle uses (the message hub of a training checkpoint). mmengine writes the config into a
    training checkpoint as text, so no ConfigDict is needed.
    """
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    allowed: List[Callable] = [codecs.encode, argparse.Namespace, set, frozenset, HistoryBuffer,
                               _renamed(_history_buffer_getattr, 'builtins', 'getattr'),
                               np.ndarray, np.dtype]
    if hasattr(np, 'dtypes'):  # numpy >= 1.25: np.dtype('f8') is a np.dtypes.Float64DType
        allowed += [cls for cls in vars(np.dtypes).values()
                    if isinstance(cls, type) and issubclass(cls, np.dtype)]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed += [_renamed(multiarray.scalar, module, 'scalar'),
                    _renamed(multiarray._reconstruct, module, '_reconstruct')]
    return allowed


@contextmanager
def _allow_listed() -> Iterator[None]:
    """``safe_globals()`` added to torch's allow-list for one load; the previous list (whatever
    the user added) is restored afterwards, also on errors. torch keeps one list per process:
    a load in another thread at the same moment sees the additions too."""
    serialization = torch.serialization
    if not _TORCH_HAS_SAFE_GLOBALS:
        yield
        return
    previous = list(serialization.get_safe_globals())
    serialization.add_safe_globals(safe_globals())
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(previous)


# -- reading a file --------------------------------------------------------------------------
def _describe_bytes(header: bytes, size: int) -> str:
    """What a file that is not a torch checkpoint looks like, from its first bytes."""
    if header.lstrip()[:15].lower().startswith((b'<!doctype html', b'<html')):
        return 'an HTML page (a failed download?)'
    if (len(header) >= 10 and header[8:10] == b'{"'
            and int.from_bytes(header[:8], 'little') < size):
        return 'a safetensors file (read it with safetensors.torch.load_file)'
    text = header.decode('utf-8', 'ignore')
    if b'\0' not in header and text and all(c.isprintable() or c in '\t\r\n' for c in text):
        return f'a text file (it starts with {text[:40]!r})'
    return f'a file that starts with the bytes {header[:8]!r}'


def _check_format(header: bytes, size: int, name: str) -> str:
    """'zip' (torch >= 1.6) or 'legacy' (a pickle), or a ValueError saying what the file is."""
    if size == 0:
        raise ValueError(f'checkpoint {name!r} is empty (0 bytes): an interrupted download or '
                         'copy?')
    if header.startswith(b'PK\x03\x04'):
        return 'zip'
    if header[:1] == b'\x80':
        return 'legacy'
    raise ValueError(f'checkpoint {name!r} is not a PyTorch checkpoint: it is '
                     f'{_describe_bytes(header, size)}, {size} bytes; expected a file written by '
                     'torch.save')


def _refusal(err: BaseException) -> Optional[str]:
    """The global (or the reason) for which torch's weights-only unpickler refused a file."""
    message = str(err)
    found = re.search(r'GLOBAL (\S+)', message)
    if found:
        return found.group(1)
    if isinstance(err, UnsafeCheckpointError) or 'Weights only load failed' in message:
        reason = message.split('WeightsUnpickler error:')[-1].strip().splitlines()[0]
        # an opcode the restricted unpickler does not know: not torch.save's format
        return None if reason.startswith('Unsupported operand') else reason
    return None


def _read_error(err: BaseException, source: Union[str, BytesIO], name: str, kind: str,
                size: int) -> Exception:
    """A ValueError (unreadable content) or RuntimeError naming the file and the cause."""
    detail = str(err).split('WeightsUnpickler error:')[-1].strip().split('\n')[0]
    message = f'{type(err).__name__}: {detail}'
    if kind == 'zip':
        if isinstance(source, BytesIO):
            source.seek(0)
        if zipfile.is_zipfile(source):
            cause = 'a zip archive that torch.save did not write'
        else:
            cause = 'an incomplete or corrupt zip archive (a truncated download or copy?)'
    elif isinstance(err, (EOFError, pickle.UnpicklingError)) or re.search(
            r'truncated|Ran out of input|invalid load key|magic number', str(err)):
        cause = 'an incomplete or corrupt pickle (truncated?), or not written by torch.save'
    else:
        return RuntimeError(f'checkpoint {name!r} could not be loaded: {message}')
    return ValueError(f'checkpoint {name!r} cannot be read: it is {cause}, {size} bytes '
                      f'({message})')


def _torch_load(source: Union[str, BytesIO], name: str, header: bytes, size: int,
                map_location: Any, trust: bool) -> Any:
    kind = _check_format(header, size, name)
    if not (trust or _TORCH_HAS_WEIGHTS_ONLY):
        raise UnsafeCheckpointError(
            f'checkpoint {name!r} was not loaded: torch {torch.__version__} has no safe loader '
            '(torch.load(weights_only=True) needs torch >= 1.13); upgrade torch or, '
            + TRUST_HINT)
    try:
        if not trust:
            with _allow_listed():
                return torch.load(source, map_location=map_location, weights_only=True)
        print_log(f'loading checkpoint {name!r} with full unpickling (trusted)',
                  logger='current', level=logging.WARNING)
        if _TORCH_HAS_WEIGHTS_ONLY:
            return torch.load(source, map_location=map_location, weights_only=False)
        return torch.load(source, map_location=map_location)
    except Exception as err:
        needed = None if trust else _refusal(err)
        if needed is None:
            raise _read_error(err, source, name, kind, size) from err
        older = ('' if _TORCH_HAS_SAFE_GLOBALS else
                 f' (torch {torch.__version__} cannot extend its allow-list; with torch >= 2.4 '
                 'numpy values, argparse.Namespace and mmengine training checkpoints load)')
        raise UnsafeCheckpointError(
            f'checkpoint {name!r} was refused by the safe loader (torch.load with '
            f'weights_only=True): it needs {needed}, which is not allow-listed{older}. Unpickling '
            f'it runs whatever code the file names; {TRUST_HINT}') from err


def _load_local(filename: str, map_location: Any, trust: bool,
                name: Optional[str] = None) -> Any:
    path = osp.expanduser(filename)
    name = name or filename
    if not osp.exists(path):
        raise FileNotFoundError(f'checkpoint file not found: {name!r}')
    if osp.isdir(path):
        raise IsADirectoryError(f'checkpoint {name!r} is a directory, not a file')
    try:
        with open(path, 'rb') as file:
            header = file.read(64)
    except PermissionError as err:
        raise PermissionError(f'checkpoint {name!r} cannot be read: permission denied') from err
    except OSError as err:
        raise OSError(f'checkpoint {name!r} cannot be read: {err}') from err
    return _torch_load(path, name, header, osp.getsize(path), map_location, trust)


def _load_bytes(data: bytes, name: str, map_location: Any, trust: bool) -> Any:
    return _torch_load(BytesIO(data), name, data[:64], len(data), map_location, trust)


def _download(url: str) -> str:
    """The cached copy of ``url`` under torch's hub dir, downloaded once (as torch.hub does)."""
    from urllib.parse import urlparse
    model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(model_dir, exist_ok=True)
    cached = osp.join(model_dir, osp.basename(urlparse(url).path))
    if not osp.exists(cached):
        print_log(f'downloading {url} to {cached}', logger='current')
        torch.hub.download_url_to_file(url, cached, None, progress=os.isatty(0))
    return cached


def _load_http(url: str, map_location: Any, trust: bool) -> Any:
    """Rank 0 downloads first, the others then find the cached file (as mmengine does)."""
    from mmengine.dist import get_dist_info
    rank, world_size = get_dist_info()
    if rank == 0:
        cached = _download(url)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            cached = _download(url)
    return _load_local(cached, map_location, trust, name=f'{url} (cached as {cached})')


def _model_url(table: Mapping[str, str], name: str, scheme: str) -> str:
    if name not in table:
        raise ValueError(f'{scheme}{name}: unknown model name; known names include '
                         f'{sorted(table)[:10]}')
    return table[name]


def _load_torchvision(filename: str, map_location: Any, trust: bool) -> Any:
    from mmengine.runner.checkpoint import get_torchvision_models
    scheme, name = filename.split('://', 1)
    url = _model_url(get_torchvision_models(), name, scheme + '://')
    return _load_http(url, map_location, trust)


def _load_openmmlab(filename: str, map_location: Any, trust: bool) -> Any:
    from mmengine.runner.checkpoint import (
        _get_mmengine_home,
        get_deprecated_model_names,
        get_external_models,
    )
    scheme, name = filename.split('://', 1)
    name = get_deprecated_model_names().get(name, name)
    url = _model_url(get_external_models(), name, scheme + '://')
    if url.startswith(('http://', 'https://')):
        return _load_http(url, map_location, trust)
    return _load_local(osp.join(_get_mmengine_home(), url), map_location, trust,
                       name=f'{filename} ({url})')


def _load_mmcls(filename: str, map_location: Any, trust: bool) -> Any:
    from mmengine.runner.checkpoint import _process_mmcls_checkpoint, get_mmcls_models
    name = filename[len('mmcls://'):]
    url = _model_url(get_mmcls_models(), name, 'mmcls://')
    return _process_mmcls_checkpoint(_load_http(url, map_location, trust))


def _load_ceph(filename: str, map_location: Any, trust: bool) -> Any:
    from mmengine.fileio import get_file_backend
    backend = get_file_backend(filename, backend_args={'backend': 'petrel'})
    return _load_bytes(backend.get(filename), filename, map_location, trust)


def _load_pavi(filename: str, map_location: Any, trust: bool) -> Any:
    try:
        from pavi import modelcloud
    except ImportError as err:
        raise ImportError(f'{filename}: pavi:// checkpoints need the pavi package') from err
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as tmp_dir:
        downloaded = osp.join(tmp_dir, model.name)
        model.download(downloaded)
        return _load_local(downloaded, map_location, trust, name=filename)


# The schemes of mmengine's CheckpointLoader, with the same prefixes (regular expressions matched
# at the start of the name, longest first), each reading through the safe loader.
_SCHEMES: Tuple[Tuple[str, Callable[[str, Any, bool], Any]], ...] = (
    ('torchvision://', _load_torchvision),
    ('pavi://', _load_pavi),
    ('openmmlab://', _load_openmmlab),
    ('open-mmlab://', _load_openmmlab),
    ('modelzoo://', _load_torchvision),
    ('mmcls://', _load_mmcls),
    ('https://', _load_http),
    ('http://', _load_http),
    (r'(\S+\:)?s3://', _load_ceph),
    (r'(\S+\:)?petrel://', _load_ceph),
    ('', _load_local),
)


def load_checkpoint_file(filename: Union[str, os.PathLike], map_location: Any = 'cpu',
                         trust: bool = False) -> Any:
    """Read a checkpoint with the safe loader (see the module docstring).

    Args:
        filename: a local path, or a form mmengine's CheckpointLoader accepts: ``http(s)://``,
            ``torchvision://``, ``open-mmlab://``, ``mmcls://``, ``s3://``, ``pavi://``
            (downloads are cached in torch's hub dir).
        map_location: as for ``torch.load``.
        trust: unpickle everything (``weights_only=False``), which runs whatever code the file
            names: only for a file you trust.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened.
        ValueError: it is empty, truncated, or not a torch checkpoint (what it is instead).
        UnsafeCheckpointError: it needs a global outside the allow-list (named).
    """
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f'a checkpoint is a path or URL string, got {type(filename).__name__}')
    filename = os.fspath(filename)
    for pattern, loader in _SCHEMES:
        if re.match(pattern, filename):
            return loader(filename, map_location, trust)
    raise AssertionError('the local scheme matches every name')


@contextmanager
def safe_mmengine_loading(trusted: Iterable[Optional[str]] = ()) -> Iterator[None]:
    """Route mmengine's ``CheckpointLoader`` (``Runner.resume``/``load_checkpoint``,
    ``load_from``, ``Pretrained`` init of mm modules) through ``load_checkpoint_file`` while the
    context is open; mmengine's own loaders call ``torch.load`` without ``weights_only``.

    Args:
        trusted: checkpoints (paths or URLs, as the tools name them) read with full unpickling;
            every other one goes through the safe loader. ``None`` entries are ignored.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    trusted_names = {_normalised(name) for name in trusted if name}

    def load_from_mmvit_safe(filename: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(filename, map_location,
                                    trust=_normalised(filename) in trusted_names)

    previous = OrderedDict(CheckpointLoader._schemes)  # register_scheme edits it in place
    CheckpointLoader.register_scheme([p for p, _ in _SCHEMES], load_from_mmvit_safe, force=True)
    try:
        yield
    finally:
        CheckpointLoader._schemes = previous


def _normalised(filename: str) -> str:
    if '://' in filename:
        return filename
    return osp.abspath(osp.expanduser(filename))


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# -- the weights inside a checkpoint ---------------------------------------------------------
def _listed(items: Sequence[str], limit: Optional[int] = 10) -> str:
    if limit is None or len(items) <= limit:
        return ', '.join(items)
    return ', '.join(items[:limit]) + f' ... and {len(items) - limit} more'


def _first_mapping(checkpoint: Mapping, keys: Sequence[str]) -> Tuple[Optional[str], Any]:
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return key, checkpoint[key]
    return None, None


def check_finite(state_dict: Mapping[str, Any], name: str = 'checkpoint') -> None:
    """Refuse NaN or infinite values, naming the tensors that hold them."""
    bad = [key for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.device.type != 'meta'
           and (value.is_floating_point() or value.is_complex())
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f'checkpoint {name!r} holds NaN or infinite values in {len(bad)} '
                         f'tensor(s): {_listed(bad)}; refusing to load it (a diverged training '
                         'run or a corrupt file?)')


def extract_state_dict(checkpoint: Any, use_ema: bool = False, prefix: Optional[str] = None,
                       name: str = 'checkpoint',
                       logger: Logger = 'current') -> 'OrderedDict[str, torch.Tensor]':
    """The finite model weights inside a checkpoint, without DataParallel/mm wrapper prefixes.

    Args:
        checkpoint: what ``load_checkpoint_file`` returned: a state dict, or a dict holding one
            under ``model`` / ``state_dict`` / ``module`` and/or ``state_dict_ema`` /
            ``model_ema``. The raw weights are taken by default, the EMA ones with ``use_ema``
            or when they are the only ones (logged either way).
        prefix: keep only the keys under this prefix (without it); by default the ``backbone.``
            keys of a full mmdet/mmseg model, or all keys when there are none.
        name: the checkpoint's path or URL, for messages.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'checkpoint {name!r} must hold a dict, got {type(checkpoint).__name__}')
    raw_key, raw = _first_mapping(checkpoint, _CONTAINER_KEYS)
    ema_key, ema = _first_mapping(checkpoint, _EMA_KEYS)
    if ema_key and (use_ema or raw_key is None):
        key, state = ema_key, ema
        reason = 'use_ema=True' if use_ema else 'the checkpoint holds no other weights'
        print_log(f'{name}: using the EMA weights {ema_key!r} ({reason})', logger=logger)
    elif raw_key:
        key, state = raw_key, raw
        if use_ema:
            print_log(f'{name}: use_ema=True but the checkpoint has no {_EMA_KEYS[0]!r} or '
                      f'{_EMA_KEYS[1]!r}; using {raw_key!r}', logger=logger, level=logging.WARNING)
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        key, state = None, checkpoint
    else:
        raise ValueError(f'checkpoint {name!r} holds no state dict: expected tensors or one of '
                         f'the keys {_CONTAINER_KEYS + _EMA_KEYS}, found keys '
                         f'{sorted(map(str, checkpoint))[:10]}')
    out = OrderedDict()
    for param, value in state.items():
        while param.startswith(_WRAPPER_PREFIX):
            param = param[len(_WRAPPER_PREFIX):]
        out[param] = value
    wanted = prefix.rstrip('.') + '.' if prefix else None
    if wanted is None and any(k.startswith(_BACKBONE_PREFIX) for k in out):
        wanted = _BACKBONE_PREFIX
    if wanted:
        kept = OrderedDict((k[len(wanted):], v) for k, v in out.items() if k.startswith(wanted))
        if not kept:
            where = repr(key) if key else 'the top level'
            raise ValueError(f'checkpoint {name!r} has no key under prefix={prefix!r} (in '
                             f'{where}); its first keys: {_listed(list(out), 5)}')
        if len(kept) < len(out):
            print_log(f'{name}: took the {len(kept)} tensors under {wanted!r}, left out '
                      f'{len(out) - len(kept)} others', logger=logger)
        out = kept
    check_finite(out, name)
    return out


# -- which model a checkpoint is for ---------------------------------------------------------
class _Layout(NamedTuple):
    name: str
    signature: str  # a key pattern only this family and layout has
    blocks: str     # groups (stage, block) or (block,) of the block keys
    width: str      # the key whose first dim is the embedding width


_LAYOUTS = (
    _Layout('BOAT-Swin, public layout', r'^layers\.\d+\.blocks\.\d+\.attnC\.',
            r'^layers\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    _Layout('BOAT-Swin, converted layout',
            r'^stages\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$',
            r'^stages\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    _Layout('BOAT-CSWin, public layout', r'^stage\d\.\d+\.content_attn\.',
            r'^stage(\d)\.(\d+)\.', 'stage1_conv_embed.0.weight'),
    _Layout('BOAT-CSWin, converted layout', r'^stages\.\d+\.blocks\.\d+\.attn\.lepe\.\d+\.',
            r'^stages\.(\d+)\.blocks\.(\d+)\.', 'patch_embed.proj.weight'),
    _Layout('Refiner-ViT, public layout', r'^blocks\.\d+\.attn\.DLA\.', r'^blocks\.(\d+)\.',
            'patch_embed.proj.weight'),
    _Layout('Refiner-ViT, converted layout', r'^blocks\.\d+\.attn\.dla\.', r'^blocks\.(\d+)\.',
            'patch_embed.proj.weight'),
    _Layout('MAFormer', r'^stages\.\d+\.blocks\.\d+\.gld\.', r'^stages\.(\d+)\.blocks\.(\d+)\.',
            'patch_embed.proj.weight'),
)


def _layout(state_dict: Mapping[str, Any]) -> Optional[_Layout]:
    """The layout most keys of a state dict have the signature of; None if no key has one."""
    counts = [sum(1 for key in state_dict if re.search(layout.signature, key))
              for layout in _LAYOUTS]
    return _LAYOUTS[counts.index(max(counts))] if any(counts) else None


def key_family(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The backbone family ('BOAT-Swin', 'BOAT-CSWin', 'Refiner-ViT', 'MAFormer') whose keys a
    state dict holds, in any layout; None if it looks like none of them."""
    layout = _layout(state_dict)
    return None if layout is None else layout.name.split(',')[0]


def describe_keys(state_dict: Mapping[str, Any]) -> str:
    """Which family and layout the keys of a state dict look like, with width and depths."""
    layout = _layout(state_dict)
    if layout is None:
        return ('none of BOAT-Swin, BOAT-CSWin, Refiner-ViT or MAFormer (its first keys: '
                f'{_listed(list(state_dict), 4)})')
    details = []
    width = state_dict.get(layout.width)
    if isinstance(width, torch.Tensor) and width.dim() > 0:
        details.append(f'embed_dims {width.shape[0]}')
    blocks: Dict[int, int] = {}
    for key in state_dict:
        found = re.match(layout.blocks, key)
        if found:
            stage, block = (0, found.group(1)) if found.re.groups == 1 else found.groups()
            blocks[int(stage)] = max(blocks.get(int(stage), 0), int(block) + 1)
    if len(blocks) > 1:
        details.append(f'depths {tuple(blocks[s] for s in sorted(blocks))}')
    elif blocks:
        details.append(f'{max(blocks.values())} blocks')
    return layout.name + (f' ({", ".join(details)})' if details else '')


# -- loading into a module -------------------------------------------------------------------
class LoadReport(NamedTuple):
    """Keys of a state-dict load that did not match the model, each with the reason."""
    missing: List[str]       # in the model, not in the checkpoint
    unexpected: List[str]    # in the checkpoint, no such key in the model
    mismatched: List[str]    # 'key: checkpoint (a, b) vs model (c, d)'
    loaded: int = 0          # tensors of the model that were loaded
    total: int = 0           # tensors of the model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: Optional[int] = None) -> str:
        """Every unmatched key with its reason (at most ``limit`` of each kind)."""
        parts = []
        if self.mismatched:
            parts.append('shape mismatch (not loaded): ' + _listed(self.mismatched, limit))
        if self.missing:
            parts.append('missing in checkpoint (left at initialisation): '
                         + _listed(self.missing, limit))
        if self.unexpected:
            parts.append('unexpected in checkpoint (ignored): '
                         + _listed(self.unexpected, limit))
        return '; '.join(parts) if parts else 'all keys matched'


def _convert(module: nn.Module, convert: Callable[[Dict[str, Any]], Dict[str, Any]],
             state_dict: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """``convert(state_dict)``, its errors re-raised naming the checkpoint and its family."""
    try:
        return convert(dict(state_dict))
    except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as err:
        raise ValueError(
            f'checkpoint {name!r} cannot be converted for {type(module).__name__} '
            f'({type(err).__name__}: {err}); its keys look like {describe_keys(state_dict)}, '
            f'the model is {describe_keys(module.state_dict())}') from err


def load_state_dict_report(module: nn.Module,
                           state_dict: Mapping[str, Any],
                           ignore_missing: Sequence[str] = (),
                           logger: Optional[Logger] = None,
                           checkpoint: Optional[str] = None,
                           convert: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
                           min_loaded: float = 0.0,
                           source: Optional[Mapping[str, Any]] = None) -> LoadReport:
    """Load what matches, and log every key that does not, by name and reason.

    The report is logged as INFO when every key matched, else as WARNING.

    Args:
        ignore_missing: substrings of model keys that a public checkpoint is known not to have
            (e.g. the per-output norms a classification model lacks); they are not reported.
        checkpoint: the checkpoint's path or URL, for messages.
        convert: maps the checkpoint's keys/tensors onto the module's first (a backbone's
            ``convert_checkpoint``); errors in it are reported with the checkpoint's name.
        min_loaded: the smallest share of the module's tensors that must load; below it a
            ValueError names the checkpoint, the count and the family its keys look like. The
            same ValueError refuses a checkpoint whose keys name another family than the
            module's (whatever share would load): training never starts from a mixture.
        source: the state dict as the checkpoint holds it, when ``state_dict`` was converted
            already (for the family in messages).
    """
    name = checkpoint or 'state dict'
    source = state_dict if source is None else source
    if convert is not None:
        state_dict = _convert(module, convert, state_dict, name)
    own: Dict[str, torch.Tensor] = module.state_dict()
    loadable, unexpected, mismatched = OrderedDict(), [], []
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif not isinstance(value, torch.Tensor):
            mismatched.append(f'{key}: checkpoint holds a {type(value).__name__}, not a tensor')
        elif own[key].shape != value.shape:
            mismatched.append(
                f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            loadable[key] = value
    missing = [k for k in own if k not in state_dict and not any(s in k for s in ignore_missing)]
    report = LoadReport(missing, unexpected, mismatched, len(loadable), len(own))
    cls = type(module).__name__
    family, own_family = key_family(source), key_family(own)
    other_family = family is not None and own_family is not None and family != own_family
    if other_family or len(loadable) < min_loaded * len(own):
        why = (f'its keys are {family} weights, the model is {own_family}: weights of another '
               f'family are never loaded ({len(loadable)} of its {len(own)} tensors would match)'
               if other_family else
               f'only {len(loadable)} of its {len(own)} tensors matched (fewer than '
               f'{min_loaded:.0%})')
        raise ValueError(
            f'checkpoint {name!r} does not fit {cls}: {why}. The checkpoint looks like '
            f'{describe_keys(source)}; the model is {describe_keys(own)}. Use the backbone type '
            'and arch the checkpoint was trained with (public checkpoints: see '
            f'tools/model_converters/). Unmatched: {report.format(limit=5)}')
    module.load_state_dict(loadable, strict=False)
    print_log(f'{cls}: loaded {len(loadable)}/{len(own)} tensors from {name}; {report.format()}',
              logger='current' if logger is None else logger,
              level=logging.INFO if report.ok else logging.WARNING)
    return report


def add_converter_arguments(parser: argparse.ArgumentParser, example_dst: str) -> None:
    """The arguments both model converters take: ``src``, ``dst``, ``--use-ema`` and
    ``--trust-checkpoint``."""
    parser.add_argument('src', help='public checkpoint (.pth / .pth.tar), as published')
    parser.add_argument('dst', help=f'output path, e.g. {example_dst}')
    parser.add_argument('--use-ema', action='store_true',
                        help='take state_dict_ema when the checkpoint also has raw weights')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle everything in SRC (runs any code it names): only for a '
                        'file you trust; by default only tensors and plain containers load')


def convert_checkpoint_file(backbone: nn.Module, src: str, dst: str, use_ema: bool = False,
                            trust: bool = False, meta: Optional[dict] = None) -> str:
    """What the model converters do: read ``src`` safely, map it with the backbone's
    ``convert_checkpoint``, check that at least half of the backbone's tensors load (every
    unmatched key is logged), and save ``{'state_dict', 'meta'}`` to ``dst``.

    Returns:
        The sha256 of the written file.
    """
    state = extract_state_dict(load_checkpoint_file(src, trust=trust), use_ema=use_ema, name=src)
    converted = _convert(backbone, backbone.convert_checkpoint, state, src)
    load_state_dict_report(backbone, converted,
                           getattr(backbone, '_keys_not_in_public_checkpoints', ()),
                           checkpoint=src, min_loaded=0.5, source=state)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save({'state_dict': converted, 'meta': dict(meta or {}, source=src)}, dst)
    print_log(f'saved {len(converted)} tensors to {dst}', logger='current')
    return file_sha256(dst)
