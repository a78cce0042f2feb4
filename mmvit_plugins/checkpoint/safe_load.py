"""Reading a checkpoint file safely: the pickle allow-list, telling what a file is from its first
bytes, and ``torch.load`` with ``weights_only=True`` (see the package docstring)."""
import argparse
import codecs
import inspect
import logging
import os.path as osp
import pickle
import re
import zipfile
from contextlib import contextmanager
from io import BytesIO
from typing import Any, Callable, Iterator, List, Optional, Union

import numpy as np
import torch
from mmengine.logging import print_log

TRUST_HINT = ('only if you trust the file and where it came from, load it with full unpickling: '
              "init_cfg=dict(type='Pretrained', checkpoint=..., trust_checkpoint=True) for a "
              'backbone of mmvit_plugins, --trust-checkpoint for tools/train.py (--resume, '
              'load_from), tools/test.py and tools/model_converters/*.py')

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


def load_local(filename: str, map_location: Any, trust: bool,
               name: Optional[str] = None) -> Any:
    """A local file through the safe loader (or fully unpickled with ``trust``); ``name``
    (default ``filename``) is what messages call it."""
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


def load_bytes(data: bytes, name: str, map_location: Any, trust: bool) -> Any:
    """A checkpoint held in memory (e.g. read from object storage), as :func:`load_local`."""
    return _torch_load(BytesIO(data), name, data[:64], len(data), map_location, trust)
