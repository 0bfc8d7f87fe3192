#!/usr/bin/env bash
# TPU VM pod slice: one command runs the same program on every worker; jax.distributed detects the
# pod by itself.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       --mode=train --config=experiments/configs/paper.py:imagenet2012,resnet50,dense --workdir=gs://bucket/r50
#
# Needs gcloud on this machine and this repository checked out as ~/sd_jax on every worker
# (`gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="git clone ... sd_jax"`).
# On the workers, requirements.txt's CPU jax must be replaced by the TPU build: pip install "jax[tpu]".
set -euo pipefail
MISSING=()
for VAR in TPU_NAME ZONE; do
  [ -n "${!VAR:-}" ] || MISSING+=("$VAR")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  echo "launch/tpu_pod.sh: missing ${MISSING[*]}; set them, e.g. TPU_NAME=my-v4-32 ZONE=us-central2-b" >&2
  exit 2
fi
command -v gcloud >/dev/null || { echo "launch/tpu_pod.sh: gcloud is not installed on this machine" >&2; exit 2; }
ARGS=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd ~/sd_jax && source scripts/venv.sh && python -m launch.main --distributed_auto$ARGS"
