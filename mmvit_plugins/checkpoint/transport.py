"""Where a checkpoint comes from: local paths, URLs (downloaded once into torch's hub dir, rank 0
first), mmengine's model-zoo schemes, and mmengine's ``CheckpointLoader`` routed through the safe
loader."""
import hashlib
import os
import os.path as osp
import re
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from mmengine.logging import print_log

from .safe_load import load_bytes, load_local


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
    return load_local(cached, map_location, trust, name=f'{url} (cached as {cached})')


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
    # A relative entry of mmengine's model table lies under mmengine's cache dir, which mmengine
    # exposes only through a private function.
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
    return load_local(osp.join(_get_mmengine_home(), url), map_location, trust,
                      name=f'{filename} ({url})')


def _load_mmcls(filename: str, map_location: Any, trust: bool) -> Any:
    # mmengine's own mapping of mmcls checkpoints (backbone keys only), public nowhere else
    from mmengine.runner.checkpoint import _process_mmcls_checkpoint, get_mmcls_models
    name = filename[len('mmcls://'):]
    url = _model_url(get_mmcls_models(), name, 'mmcls://')
    return _process_mmcls_checkpoint(_load_http(url, map_location, trust))


def _load_ceph(filename: str, map_location: Any, trust: bool) -> Any:
    from mmengine.fileio import get_file_backend
    backend = get_file_backend(filename, backend_args={'backend': 'petrel'})
    return load_bytes(backend.get(filename), filename, map_location, trust)


def _load_pavi(filename: str, map_location: Any, trust: bool) -> Any:
    try:
        from pavi import modelcloud
    except ImportError as err:
        raise ImportError(f'{filename}: pavi:// checkpoints need the pavi package') from err
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as tmp_dir:
        downloaded = osp.join(tmp_dir, model.name)
        model.download(downloaded)
        return load_local(downloaded, map_location, trust, name=filename)


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
    ('', load_local),
)


def load_checkpoint_file(filename: Union[str, os.PathLike], map_location: Any = 'cpu',
                         trust: bool = False) -> Any:
    """Read a checkpoint with the safe loader (see :mod:`mmvit_plugins.checkpoint`).

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

    # register_scheme edits the table in place; mmengine has no public way to read or
    # unregister a scheme, so the table itself is saved and put back.
    previous = OrderedDict(CheckpointLoader._schemes)
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
