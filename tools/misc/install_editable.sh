#!/usr/bin/env bash
# The project's editable install, one that openmim finds (tools/setup_env.sh runs it).
#
#   bash tools/misc/install_editable.sh PYTHON     # PYTHON: the environment's interpreter
#
# mim (0.3.8) looks for a package's .mim folder next to its metadata: pkg_resources' location
# of the distribution plus the package name. A PEP 660 editable install (pip install -e, in any
# editable_mode: the import-hook finder, compat's .pth, strict's link tree) keeps the metadata
# in site-packages and the package in the checkout, so `mim search|train|test|run mmvit_plugins`
# fails there ("model_zoo.yml is not found"). setuptools' develop install (an egg-link to the
# checkout, whose metadata is written into the checkout) puts both in the checkout, where
# setup.py links configs/, tools/ and model-index.yml into mmvit_plugins/.mim; edits show
# through as with pip install -e. pip >= 25.3 no longer runs develop itself, so it is called
# directly (setuptools < 80; requirements/build.txt pins < 70).
set -euo pipefail

python=${1:?usage: bash tools/misc/install_editable.sh PYTHON}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# A PEP 660 install of an earlier set-up would keep its metadata first on sys.path.
if compgen -G "$site/mmvit_plugins-*.dist-info" >/dev/null; then
    "$python" -m pip --disable-pip-version-check uninstall -q -y mmvit-plugins
fi
cd "$repo"
"$python" -W ignore setup.py -q develop --no-deps >/dev/null
