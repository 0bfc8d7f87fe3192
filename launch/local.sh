#!/usr/bin/env bash
# Several processes on this machine (one per GPU, or CPU processes with simulated devices), wired
# with explicit jax.distributed arguments. Usage:
#
#   NUM_PROCESSES=2 launch/local.sh --mode=train --config=experiments/configs/default.py --workdir=runs/x
#
# Set DEVICES_PER_PROCESS=N to give each CPU process N simulated devices; with GPUs each process
# sees one GPU (CUDA_VISIBLE_DEVICES=process id). PORT defaults to 12355.
set -euo pipefail
if [ -z "${NUM_PROCESSES:-}" ]; then
  echo "launch/local.sh: missing NUM_PROCESSES (how many processes to start), e.g. NUM_PROCESSES=2" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
source scripts/venv.sh
PIDS=()
for ((ID = 0; ID < NUM_PROCESSES; ID++)); do
  ENV=()
  [ -n "${DEVICES_PER_PROCESS:-}" ] && ENV+=(XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  command -v nvidia-smi >/dev/null && ENV+=(CUDA_VISIBLE_DEVICES="$ID")
  env "${ENV[@]}" python -m launch.main --coordinator_address="localhost:${PORT:-12355}" \
    --num_processes="$NUM_PROCESSES" --process_id="$ID" "$@" &
  PIDS+=($!)
done
STATUS=0
for PID in "${PIDS[@]}"; do wait "$PID" || STATUS=$?; done
exit "$STATUS"
