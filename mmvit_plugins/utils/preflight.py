"""Check, before a Runner is built, that the files a config reads exist (tools/train.py and
tools/test.py): dataset folders and annotation files, the backbone's pretrained weights and the
checkpoint to load. Every missing path is named in one message, with what prepares it."""
import os
import os.path as osp
import re
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from mmengine.config import Config

DATASETS_DOC = 'docs/get_started.md#prepare-the-datasets'
WEIGHTS_DOC = 'docs/get_started.md#pretrained-weights'
SPLITS = ('train', 'val', 'test')
_DATASET_FIELD = r'\.(data_root|ann_file|data_prefix\.\w+)$'


class MissingPath(NamedTuple):
    """A path the run would open that does not exist."""

    path: str  # as the run opens it (relative paths from the working directory)
    keys: Tuple[str, ...]  # where the config names it, e.g. ('val_dataloader.dataset.data_root',)
    kind: str  # 'dataset', 'pretrained' or 'checkpoint'


class MissingPathsError(FileNotFoundError):
    """Paths of a config are missing; the message names each and what prepares it."""

    def __init__(self, message: str, missing: Sequence[MissingPath]) -> None:
        super().__init__(message)
        self.missing = list(missing)

    def __str__(self) -> str:
        return self.args[0]


def _local(path: Any) -> bool:
    """A non-empty local path (URLs and remote storage are left to their loaders)."""
    return isinstance(path, str) and bool(path) and '://' not in path


def _dataset_paths(dataset: Any, key: str) -> Iterator[Tuple[str, str]]:
    """``(key, path)`` of the folders and files a dataset config reads, joined as mmengine's
    ``BaseDataset`` joins them; wrappers (``dataset=``, ``datasets=[...]``) are followed. A
    missing ``data_root`` is reported alone, not each path under it."""
    if not isinstance(dataset, dict):
        return
    if isinstance(dataset.get('dataset'), dict):
        yield from _dataset_paths(dataset['dataset'], f'{key}.dataset')
    for i, child in enumerate(dataset.get('datasets') or []):
        yield from _dataset_paths(child, f'{key}.datasets.{i}')
    if (dataset.get('backend_args') or {}).get('backend', 'local') != 'local':
        return
    root = dataset.get('data_root') or ''
    if root and _local(root) and not osp.exists(root):
        yield f'{key}.data_root', root
        return
    if root and not _local(root):
        return
    if _local(dataset.get('ann_file')):
        yield f'{key}.ann_file', osp.join(root, dataset['ann_file'])
    prefix = dataset.get('data_prefix') or {}
    for name, value in (prefix.items() if isinstance(prefix, dict) else ()):
        if _local(value):
            yield f'{key}.data_prefix.{name}', osp.join(root, value)


def _evaluator_paths(evaluator: Any, key: str) -> Iterator[Tuple[str, str]]:
    """``(key, path)`` of the annotation files evaluators read (e.g. mmdet's ``CocoMetric``)."""
    if isinstance(evaluator, (list, tuple)):
        for i, item in enumerate(evaluator):
            yield from _evaluator_paths(item, f'{key}.{i}')
    elif isinstance(evaluator, dict) and _local(evaluator.get('ann_file')):
        yield f'{key}.ann_file', evaluator['ann_file']


def _pretrained_paths(node: Any, key: str) -> Iterator[Tuple[str, str]]:
    """``(key, path)`` of every local ``Pretrained`` checkpoint in the ``init_cfg`` of a model
    config and its sub-modules; ``key`` names the ``init_cfg`` to set to None instead."""
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        for init in init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]:
            if (isinstance(init, dict) and init.get('type') == 'Pretrained'
                    and _local(init.get('checkpoint'))):
                yield f'{key}.init_cfg', init['checkpoint']
        for name, value in node.items():
            if name != 'init_cfg':
                yield from _pretrained_paths(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _pretrained_paths(value, f'{key}.{i}')


def missing_paths(cfg: Config, splits: Sequence[str], pretrained: bool = False,
                  checkpoints: Sequence[Tuple[str, Optional[str]]] = ()) -> List[MissingPath]:
    """The paths of ``cfg`` a run would open that do not exist, each once.

    ``splits``: the dataloaders the run builds, from ``'train'``, ``'val'``, ``'test'`` (a split
    whose dataloader or loop config is None is not built, as mmengine's Runner does);
    ``pretrained``: also the ``Pretrained`` checkpoints of ``model`` (a training run initializes
    the weights); ``checkpoints``: ``(key, path)`` of checkpoints to load (None: none).
    """
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f'splits={list(splits)!r}; allowed values: {SPLITS}')
    found: List[MissingPath] = []

    def add(key: str, path: str, kind: str) -> None:
        path = osp.normpath(path)
        for i, item in enumerate(found):
            if path == item.path:  # e.g. a data_root the val and test sets share
                found[i] = item._replace(keys=item.keys + (key, ))
                return
            if path.startswith(item.path + os.sep):
                return
        if not osp.exists(path):
            found.append(MissingPath(path, (key, ), kind))

    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not cfg.get(f'{split}_cfg'):
            continue
        for key, path in _dataset_paths(loader.get('dataset'), f'{split}_dataloader.dataset'):
            add(key, path, 'dataset')
        if split != 'train':
            for key, path in _evaluator_paths(cfg.get(f'{split}_evaluator'),
                                              f'{split}_evaluator'):
                add(key, path, 'dataset')
    if pretrained:
        for key, path in _pretrained_paths(cfg.get('model'), 'model'):
            add(key, path, 'pretrained')
    for key, path in checkpoints:
        if _local(path):
            add(key, path, 'checkpoint')
    return found


def format_missing(missing: Sequence[MissingPath], tool: str) -> str:
    """One message: each missing path, then what prepares each kind and the alternatives."""
    lines = [f'{tool}: {len(missing)} path(s) the config names do not exist (relative paths are '
             f'read from {os.getcwd()}):']
    lines += [f'  {item.path}  ({", ".join(item.keys)})' for item in missing]
    kinds = {item.kind for item in missing}
    if 'dataset' in kinds:
        roots = sorted({re.sub(_DATASET_FIELD, '.data_root', key) for item in missing
                        if item.kind == 'dataset' for key in item.keys if '_dataloader.' in key})
        point = ' '.join(f'{key}=DIR' for key in roots) or '<dataloader>.dataset.data_root=DIR'
        lines.append(f'Datasets: prepare them as {DATASETS_DOC} describes, or point the config '
                     f'at your copy: --cfg-options {point}')
    if 'pretrained' in kinds:
        keys = ' '.join(sorted({f'{key}=None' for item in missing if item.kind == 'pretrained'
                                for key in item.keys}))
        lines.append(f'Pretrained weights: download and convert them as {WEIGHTS_DOC} '
                     f'describes, or train from random initialization: --cfg-options {keys}')
    if 'checkpoint' in kinds:
        lines.append('Checkpoint: give the path of an existing checkpoint file.')
    if kinds & {'dataset', 'pretrained'}:
        lines.append('No data at hand: `make demo` (segmentation) or `make demo-det` (detection) '
                     'trains and evaluates a model on a generated toy dataset.')
    return '\n'.join(lines)


def check_paths(cfg: Config, tool: str, splits: Sequence[str], pretrained: bool = False,
                checkpoints: Sequence[Tuple[str, Optional[str]]] = ()) -> None:
    """Raise :class:`MissingPathsError` naming every path of :func:`missing_paths`, if any."""
    missing = missing_paths(cfg, splits, pretrained, checkpoints)
    if missing:
        raise MissingPathsError(format_missing(missing, tool), missing)
