#!/usr/bin/env bash
# Distributed training on one or more nodes with torchrun and mmengine's `pytorch` launcher.
#
#   bash tools/dist_train.sh CONFIG NPROC [tools/train.py options...]
#
# NPROC processes on this node (one per GPU). On one node without PORT, torchrun's standalone
# rendezvous listens on a port the system assigns, so several jobs on one machine never collide;
# PORT fixes the port. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT, default 29500)
# on every node. Without CUDA the processes use gloo on CPU (see docs/get_started.md).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONFIG NPROC [train.py options...]" >&2
    exit 2
fi
config=$1
nproc=$2
shift 2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${NNODES:-1}" == 1 && -z "${PORT:-}" ]]; then
    rendezvous=(--standalone)  # one node: torchrun binds a port the system assigns
else
    rendezvous=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
                --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}")
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m torch.distributed.run \
    "${rendezvous[@]}" --nproc_per_node="$nproc" \
    "$repo/tools/train.py" "$config" --launcher pytorch "$@"
