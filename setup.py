"""Packaging (metadata in setup.cfg): ships ``configs/``, ``tools/`` and ``model-index.yml`` inside
the package as ``mmvit_plugins/.mim``, as OpenMMLab packages do, so that openmim finds them
(``mim search|train|test mmvit_plugins ...``).

A wheel or sdist build (``pip install .``) copies them there; an editable install links them
instead, so that edits show through (``tools/misc/install_editable.sh``, the develop install
that openmim finds, or ``pip install -e .``, which openmim does not find).
"""
import os
import os.path as osp
import platform
import shutil
import sys

from setuptools import setup

REPO = osp.dirname(osp.abspath(__file__))
MIM_DIR = osp.join(REPO, 'mmvit_plugins', '.mim')
MIM_FILES = ('configs', 'tools', 'model-index.yml')
LINK_COMMANDS = ('develop', 'editable_wheel')
COPY_COMMANDS = ('sdist', 'bdist_wheel', 'build', 'build_py', 'install')


def add_mim_extension() -> None:
    """Copy (builds) or link (editable installs) ``MIM_FILES`` into ``mmvit_plugins/.mim``."""
    if any(command in sys.argv for command in LINK_COMMANDS):
        mode = 'copy' if platform.system() == 'Windows' else 'symlink'  # no symlinks there
    elif any(command in sys.argv for command in COPY_COMMANDS):
        mode = 'copy'
    else:  # egg_info, dist_info, ...: nothing is built
        return
    os.makedirs(MIM_DIR, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(REPO, name), osp.join(MIM_DIR, name)
        if not osp.exists(src):
            # A build from an sdist: its .mim already holds the copies.
            if osp.exists(dst):
                continue
            raise FileNotFoundError(f'{src} is missing: the package would lack it in .mim')
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, MIM_DIR), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup()
