#!/usr/bin/env bash
# Distributed evaluation with torchrun and mmengine's `pytorch` launcher.
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT NPROC [tools/test.py options...]
#
# On one node without PORT, torchrun's standalone rendezvous listens on a port the system
# assigns; PORT fixes the port. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT, default
# 29500) on every node.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 CONFIG CHECKPOINT NPROC [test.py options...]" >&2
    exit 2
fi
config=$1
checkpoint=$2
nproc=$3
shift 3
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${NNODES:-1}" == 1 && -z "${PORT:-}" ]]; then
    rendezvous=(--standalone)  # one node: torchrun binds a port the system assigns
else
    rendezvous=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
                --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}")
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m torch.distributed.run \
    "${rendezvous[@]}" --nproc_per_node="$nproc" \
    "$repo/tools/test.py" "$config" "$checkpoint" --launcher pytorch "$@"
