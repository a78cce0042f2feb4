"""tools/setup_env.sh: stops early with a reason on bad set-up states; idempotent when done."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'setup_env.sh'
TOOLS = ('bash', 'dirname', 'cat', 'sha256sum', 'cut', 'sed', 'ls', 'head', 'mktemp', 'nproc')


def run_setup(tmp_path, path_dirs, **env):
    base = {'HOME': str(tmp_path), 'PATH': os.pathsep.join(map(str, path_dirs)),
            'MMVIT_VENV': str(tmp_path / 'venv'), 'MMVIT_CACHE': str(tmp_path / 'cache')}
    return subprocess.run(['bash', str(SCRIPT)], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def bin_without_compiler(tmp_path):
    """A PATH directory with the shell tools and python3, but no C++ compiler."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), bin_dir / tool)
    os.symlink(sys.executable, bin_dir / 'python3')
    return bin_dir


def test_missing_interpreter_is_named(tmp_path, bin_without_compiler):
    result = run_setup(tmp_path, [bin_without_compiler], PYTHON='python9.9')
    assert result.returncode == 1
    assert "no 'python9.9' on PATH" in result.stderr
    assert not (tmp_path / 'venv').exists()


def test_missing_compiler_stops_before_any_install(tmp_path, bin_without_compiler):
    result = run_setup(tmp_path, [bin_without_compiler])
    assert result.returncode == 1
    assert 'no C++ compiler found' in result.stderr
    assert 'apt-get install g++' in result.stderr
    assert not (tmp_path / 'venv').exists()


def test_wheel_cached_for_another_torch_is_not_reused(tmp_path, bin_without_compiler):
    other = tmp_path / 'cache' / 'wheels' / 'mmcv-2.1.0-torch9.9.9-cp311'
    other.mkdir(parents=True)
    (other / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl').write_bytes(b'')
    result = run_setup(tmp_path, [bin_without_compiler])
    assert result.returncode == 1
    assert 'no C++ compiler found' in result.stderr  # it must build, so it needs a compiler


@pytest.mark.skipif(not (REPO / '.venv' / '.mmvit_stamp').exists(),
                    reason='runs against the project environment made by make env')
def test_second_run_is_a_no_op():
    result = subprocess.run(['bash', str(SCRIPT)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'MMVIT_VENV': str(REPO / '.venv')})
    assert result.returncode == 0, result.stderr
    assert 'is up to date' in result.stdout


def _fake_python(bin_dir: Path, version: str) -> None:
    """``python3`` that answers every call with ``version``, as the version check asks it."""
    fake = bin_dir / 'python3'
    fake.unlink()
    fake.write_text(f'#!/bin/sh\necho {version}\n')
    fake.chmod(0o755)


@pytest.mark.parametrize('version', ['3.9', '3.13', '2.7'])
def test_python_outside_the_range_is_named_with_the_fix(tmp_path, bin_without_compiler, version):
    _fake_python(bin_without_compiler, version)
    result = run_setup(tmp_path, [bin_without_compiler])
    assert result.returncode == 1
    assert (f"'python3' ({bin_without_compiler / 'python3'}) is Python {version}; the pinned "
            'stack needs Python 3.10 - 3.12') in result.stderr
    assert 'PYTHON=/path/to/python3.12 make env' in result.stderr
    assert not (tmp_path / 'venv').exists()


def test_python_range_agrees_across_setup_files():
    """setup_env.sh's range, setup.cfg's python_requires and ruff's target-version match."""
    import configparser
    import re

    from packaging.specifiers import SpecifierSet
    script = SCRIPT.read_text()
    low, high = (int(re.search(rf'^py_{end}=3\.(\d+)$', script, re.M).group(1))
                 for end in ('min', 'max'))
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    allowed = SpecifierSet(cfg['options']['python_requires'])
    assert [minor for minor in range(6, 20) if f'3.{minor}' in allowed] == list(
        range(low, high + 1))
    classifiers = cfg['metadata']['classifiers']
    assert re.findall(r'Python :: 3\.(\d+)', classifiers) == [str(m) for m in range(low, high + 1)]
    pyproject = (REPO / 'pyproject.toml').read_text()
    assert re.search(r'^target-version = "py3(\d+)"', pyproject, re.M).group(1) == str(low)
