#!/usr/bin/env bash
# SLURM GPU cluster: one process per GPU, jax.distributed initialised from the SLURM environment.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm.sh \
#       --mode=train --config=experiments/configs/paper.py:cifar10,resnet20,dense --workdir=/shared/runs/r20
#
# Inside the allocation each task runs `python -m launch.main --distributed_auto ARGS`; JAX reads
# SLURM_* (coordinator = first node, process id = SLURM_PROCID). The workdir must be on a file system
# every node sees (checkpoints are written by all processes together).
set -euo pipefail
MISSING=()
for VAR in SLURM_JOB_ID SLURM_NTASKS SLURM_JOB_NODELIST; do
  [ -n "${!VAR:-}" ] || MISSING+=("$VAR")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  echo "launch/slurm.sh: not inside a SLURM allocation; missing ${MISSING[*]}. Submit it with sbatch (see the header)." >&2
  exit 2
fi
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec srun --kill-on-bad-exit=1 python -m launch.main --distributed_auto "$@"
