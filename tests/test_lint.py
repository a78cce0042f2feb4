"""The tree passes the project's ruff configuration (pyproject.toml)."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which('ruff', path=str(Path(sys.executable).parent)) or shutil.which('ruff')
    assert ruff, 'ruff is part of requirements/tests.txt; run make env'
    result = subprocess.run([ruff, 'check', 'mmvit_plugins', 'tools', 'tests', 'configs'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
