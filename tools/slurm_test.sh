#!/usr/bin/env bash
# Evaluation on a Slurm cluster (mmengine's `slurm` launcher: one task per GPU).
#
#   GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options...]
#
# Environment: GPUS (default 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS.
set -euo pipefail
if [[ $# -lt 4 ]]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options...]" >&2
    exit 2
fi
partition=$1
job_name=$2
config=$3
checkpoint=$4
shift 4
gpus=${GPUS:-8}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2086  # SRUN_ARGS holds several words on purpose
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec srun -p "$partition" \
    --job-name="$job_name" --gres="gpu:${GPUS_PER_NODE:-8}" --ntasks="$gpus" \
    --ntasks-per-node="${GPUS_PER_NODE:-8}" --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "${PYTHON:-python}" -u "$repo/tools/test.py" "$config" "$checkpoint" --launcher slurm "$@"
