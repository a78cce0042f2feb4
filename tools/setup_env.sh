#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment with the pinned OpenMMLab stack.
#
#   bash tools/setup_env.sh            # idempotent; seconds when nothing changed
#
# Environment variables:
#   MMVIT_VENV    where the virtual environment lives          (default: <repo>/.venv)
#   MMVIT_CACHE   where built mmcv wheels are kept, outside the repo
#                                                              (default: ~/.cache/mmvit_plugins)
#   PYTHON        interpreter used to create the environment   (default: python3;
#                 Python 3.10 - 3.12)
#   MAX_JOBS      parallel compile jobs for mmcv's ops          (default: number of cores)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMVIT_VENV:-$repo/.venv}
cache=${MMVIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmvit_plugins}
python=${PYTHON:-python3}
req=$repo/requirements

say() { printf '[setup_env] %s\n' "$*"; }
die() {
    printf '[setup_env] ERROR: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '[setup_env]   %s\n' "$line" >&2; done
    exit 1
}

pinned() {  # pinned <file> <package>: the version pinned for <package> in <file>
    sed -n "s/^$2==\([^ ]*\).*/\1/p" "$1"
}

torch_version=$(pinned "$req/torch.txt" torch)
mmcv_version=$(pinned "$req/mmcv.txt" mmcv)
ort_version=$(pinned "$req/deploy.txt" onnxruntime)
# The Python versions every pin installs on (setup.cfg's python_requires says the same):
# onnxruntime has wheels from 3.10 on, torch and torchvision up to 3.12.
py_min=3.10
py_max=3.12

# A stamp of every file that decides the environment's content: unchanged stamp + passing checks
# means nothing to do.
stamp_file=$venv/.mmvit_stamp
stamp=$(cat "$req"/*.txt "$repo/setup.cfg" "$repo/setup.py" "$repo/pyproject.toml" "$0" \
    "$repo/tools/misc/install_editable.sh" |
    sha256sum | cut -d' ' -f1)

check_stack() {
    # Fails with a readable reason when the compiled ops, mmdet or mmseg do not work.
    "$venv/bin/python" - "$torch_version" "$mmcv_version" <<'EOF'
import sys

want_torch, want_mmcv = sys.argv[1], sys.argv[2]
import torch

if torch.__version__.split('+')[0] != want_torch:
    sys.exit(f'torch {torch.__version__} is installed, the pinned stack needs {want_torch}')
import mmcv

if mmcv.__version__ != want_mmcv:
    sys.exit(f'mmcv {mmcv.__version__} is installed, the pinned stack needs {want_mmcv}')
try:
    from mmcv.ops import RoIAlign, nms
except ImportError as exc:  # the extension is missing or was built for another torch
    sys.exit(f'mmcv compiled ops do not load: {exc}')
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
if keep.tolist() != [0, 2]:
    sys.exit(f'mmcv nms returned {keep.tolist()}, expected [0, 2]')
feats = torch.arange(16.).view(1, 1, 4, 4)
rois = torch.tensor([[0., 0., 0., 4., 4.]])
pooled = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False)(feats, rois)
if pooled.shape != (1, 1, 2, 2) or not torch.isfinite(pooled).all():
    sys.exit('mmcv RoIAlign returned a wrong result')
import mmdet
import mmseg
import mmvit_plugins  # noqa: F401
import os.path as osp

from mim.utils import get_installed_path

index = osp.join(get_installed_path('mmvit_plugins'), '.mim', 'model-index.yml')
if not osp.isfile(index):
    sys.exit(f'mim does not find mmvit_plugins: no {index} (a pip install -e? run setup_env.sh)')

print(f'torch {torch.__version__} | mmcv {mmcv.__version__} (ops ok) | mmdet {mmdet.__version__}'
      f' | mmseg {mmseg.__version__} | mmvit_plugins {mmvit_plugins.__version__}')
EOF
}

if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]] && check_stack 2>/dev/null; then
    say "environment $venv is up to date"
    exit 0
fi

# --- interpreter and virtual environment ---------------------------------------------------------
pick_python="choose another interpreter: PYTHON=/path/to/python$py_max make env (or PYTHON=... bash tools/setup_env.sh)"
command -v "$python" >/dev/null ||
    die "no '$python' on PATH; the pinned stack needs Python $py_min - $py_max" "$pick_python"
python_path=$(command -v "$python")
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
    die "'$python' ($python_path) does not run as a Python interpreter" "$pick_python"
minor() { [[ $1 =~ ^3\.([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}"; }  # 3.12 -> 12, else fails
found_minor=$(minor "$py_version") || found_minor=-1
if ((found_minor < $(minor "$py_min") || found_minor > $(minor "$py_max"))); then
    die "'$python' ($python_path) is Python $py_version; the pinned stack needs Python $py_min - $py_max" \
        "(onnxruntime $ort_version has wheels from Python $py_min on, torch $torch_version up to $py_max)" \
        "$pick_python"
fi
py_tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# mmcv is compiled unless a wheel for this (mmcv, torch, python) is cached: check the toolchain
# before spending minutes on downloads.
wheel_dir=$cache/wheels/mmcv-$mmcv_version-torch$torch_version-$py_tag
wheel=$(ls "$wheel_dir"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z $wheel ]]; then
    command -v g++ >/dev/null || command -v c++ >/dev/null ||
        die "no C++ compiler found; mmcv $mmcv_version must be compiled (no cached wheel in $wheel_dir)" \
            "on Debian/Ubuntu: apt-get install g++   (then run this script again)"
    inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f $inc/Python.h ]] || die "Python headers missing ($inc/Python.h)" \
        "on Debian/Ubuntu: apt-get install python3-dev"
fi

if [[ ! -x $venv/bin/python ]]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv" || die "could not create $venv" \
        "on Debian/Ubuntu: apt-get install python3-venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade 'pip>=23'

# --- torch: the pinned pair, in one command -------------------------------------------------------
say "installing torch $torch_version (pinned pair with torchvision)"
"${pip[@]}" install -q -r "$req/torch.txt"
have_torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])') ||
    die "torch does not import in $venv" "remove $venv and run again"
[[ $have_torch == "$torch_version" ]] || die "torch $have_torch is installed, the stack needs $torch_version" \
    "remove $venv (rm -rf $venv) and run again"

# --- mmcv: built once per (mmcv, torch, python), kept outside the repo -----------------------------
"${pip[@]}" install -q -r "$req/build.txt"
if [[ -z $wheel ]]; then
    say "building mmcv $mmcv_version with ops against torch $torch_version (one time, 6-18 min on 2 cores)"
    build_dir=$(mktemp -d)
    log=$cache/mmcv-build.log
    mkdir -p "$cache"
    # --no-cache-dir: pip's own wheel cache ignores which torch a wheel was built against.
    if ! MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "${pip[@]}" wheel --no-cache-dir --no-build-isolation --no-deps --no-binary mmcv \
        -w "$build_dir" -r "$req/mmcv.txt" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "mmcv build failed (full log: $log)" \
            "a compiler error: check g++ and that torch $torch_version is installed in $venv" \
            "then run this script again"
    fi
    mkdir -p "$wheel_dir"
    mv "$build_dir"/mmcv-*.whl "$wheel_dir"/
    rm -rf "$build_dir"
    wheel=$(ls "$wheel_dir"/mmcv-"$mmcv_version"-*.whl | head -n 1)
    say "cached $wheel"
else
    say "reusing cached $wheel"
fi
"${pip[@]}" install -q --no-deps --force-reinstall "$wheel"

# --- the rest of the stack, never allowed to move torch ------------------------------------------
say "installing mmengine, mmdet, mmseg, timm, mmdeploy with onnxruntime, and test tools"
constraints=$(mktemp)
cat "$req/torch.txt" "$req/mmcv.txt" >"$constraints"
"${pip[@]}" install -q -c "$constraints" -r "$req/runtime.txt" -r "$req/tests.txt" -r "$req/deploy.txt"
rm -f "$constraints"
# editable, and found by mim (search/train/test/run): see the script
bash "$repo/tools/misc/install_editable.sh" "$venv/bin/python" ||
    die "the editable install of $repo failed" "run: bash $repo/tools/misc/install_editable.sh $venv/bin/python"

# --- verify ----------------------------------------------------------------------------------------
errors=$(mktemp)
if ! versions=$(check_stack 2>"$errors"); then
    reason=$(tail -n 1 "$errors")
    rm -f "$errors"
    die "the environment does not work: $reason" \
        "if mmcv's ops fail to load, its cached wheel may be broken: rm -rf $wheel_dir and run again"
fi
rm -f "$errors"
say "$versions"
echo "$stamp" >"$stamp_file"
say "environment ready: $venv"
