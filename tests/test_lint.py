"""The tree passes the project's ruff configuration (pyproject.toml), with the ruff version that
requirements/tests.txt and setup.cfg pin (a new ruff release may add rules)."""
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which('ruff', path=str(Path(sys.executable).parent)) or shutil.which('ruff')
    assert ruff, 'ruff is part of requirements/tests.txt; run make env'
    return ruff


def test_ruff_is_the_pinned_version():
    pinned = re.findall(r'^ruff==(\S+)', (REPO / 'requirements' / 'tests.txt').read_text(),
                        re.MULTILINE)
    setup = configparser.ConfigParser()
    setup.read(REPO / 'setup.cfg')
    extra = re.findall(r'^ruff==(\S+)$', setup['options.extras_require']['tests'], re.MULTILINE)
    assert len(pinned) == 1 and extra == pinned, (pinned, extra)
    version = subprocess.run([_ruff(), '--version'], capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert version == ['ruff', pinned[0]], f'{version}: run make env'


def test_ruff_clean():
    result = subprocess.run([_ruff(), 'check', 'mmvit_plugins', 'tools', 'tests', 'configs'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
