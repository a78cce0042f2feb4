"""Importing mmvit_plugins makes every backbone buildable from mmdet's and mmseg's registries."""
import subprocess
import sys
import textwrap

import pytest

import mmvit_plugins
from mmvit_plugins.models import backbones
from tests.conftest import TINY_BACKBONES

BACKBONES = sorted(backbones.__all__)


def _registry(codebase: str):
    if codebase == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def test_version():
    assert isinstance(mmvit_plugins.__version__, str) and mmvit_plugins.__version__.count('.') == 2


def test_every_backbone_has_a_tiny_test_config():
    assert BACKBONES, 'no backbone is exported'
    assert set(BACKBONES) == set(TINY_BACKBONES)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_custom_imports_registers_in_a_fresh_interpreter(tmp_path, scope):
    name = BACKBONES[0]
    config = tmp_path / 'cfg.py'
    config.write_text(f"custom_imports = dict(imports=['mmvit_plugins'], "
                      f"allow_failed_imports=False)\ndefault_scope = '{scope}'\n")
    code = textwrap.dedent(f"""
        import sys
        from mmengine.config import Config
        assert 'mmvit_plugins' not in sys.modules
        Config.fromfile({str(config)!r})
        from {scope}.registry import MODELS
        from mmengine.registry import DefaultScope
        with DefaultScope.overwrite_default_scope({scope!r}):
            assert MODELS.get({name!r}) is not None, 'not registered'
        print('ok')
    """)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith('ok')
