"""What several test modules share: the repository root, loading scripts of tools/, and
importing the optional dependencies of the ``deploy`` extra."""
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
# onnx, onnxruntime and mmdeploy are the ``deploy`` extra, not install requirements.
DEPLOY_EXTRA = ('onnx', 'onnxruntime', 'mmdeploy')
REQUIRE_DEPLOY = 'MMVIT_REQUIRE_DEPLOY'


def import_deploy(name: str) -> ModuleType:
    """A module of the ``deploy`` extra. Where it is not installed, the test (module) skips
    with the install hint; with ``MMVIT_REQUIRE_DEPLOY=1`` (``make test``, whose environment
    installs the extra) it fails instead, so that nothing skips there unnoticed."""
    if name not in DEPLOY_EXTRA:
        raise ValueError(f'name={name!r}; allowed values: {DEPLOY_EXTRA}')
    if os.environ.get(REQUIRE_DEPLOY) == '1':
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f'{name} is part of the deploy extra: '
                               'pip install ".[deploy]"')


def load_tool(relative: str) -> ModuleType:
    """Import a script under tools/ (e.g. 'tools/misc/make_toy_dataset.py') as a module; its
    folder is on sys.path while it loads, so it can import its siblings."""
    path = ROOT / relative
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
