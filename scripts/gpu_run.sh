#!/usr/bin/env bash
# The prepared accelerator run (issue 12): one GPU, about 9 minutes, compilation included.
#
#     scripts/gpu_run.sh [CIFAR10_JPEG_ARCHIVE]        # or SD_JAX_CIFAR10_JPEG=... scripts/gpu_run.sh
#
# 1. prints the machine (nvidia-smi, CPU, the Python and its JAX devices) and stops with exit code 3
#    and a message when JAX sees no GPU (seconds, before any data or compilation);
# 2. `experiments.bench_train_step` on the GPU: ResNet-20 and ResNet-18, dense and SD, float32 and
#    bfloat16 (JSON: bench_float32.json, bench_bfloat16.json);
# 3. prepares CIFAR-10 from the JPEG archive and trains ResNet-20 from scratch, dense
#    (paper.py:cifar10_jpeg,resnet20,dense) then SD (paper.py:cifar10_jpeg,resnet20,sd_scratch,tuned),
#    each for the first SD_JAX_GPU_EPOCHS epochs (default 15) of the paper's 200-epoch schedule
#    (`optim.stop_epoch`: the learning rate follows the 200-epoch schedule), writing <run>/summary.json and
#    <run>/metrics.jsonl.
# Everything lands in one folder, $OUT when set (the device tool's), else SD_JAX_GPU_OUT, else
# runs/gpu_run_<UTC time>: gpu_run.log (this script's output), gpu_run.json (phases and seconds),
# the two benchmark JSONs, dense/ and sd/ (8 files in all). Checkpoints and prepared data go to
# SD_JAX_GPU_WORK (default /tmp/sd_jax_gpu_run) and stay out of the output folder.
#
# The Python: SD_JAX_PYTHON if set; else the checkout's .venv when it exists (carry or prebuild one
# with a CUDA jax: SD_JAX_SETUP_VENV=1 runs scripts/venv.sh and then installs
# jax[cuda12]==<the jax pin of requirements.txt>, which needs a package index or PIP_FIND_LINKS with
# the wheels); else python3 on the PATH (the device machines' image: jax with the CUDA plugin, flax,
# optax, orbax). A GPU machine may reach no network: packages that its Python lacks (on the device
# image: ml-collections, tensorflow-datasets and its dependencies, tensorboardX) travel as wheels in
# a folder named by SD_JAX_WHEELS, installed offline with --no-deps into a scratch site folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
ARCHIVE="${1:-${SD_JAX_CIFAR10_JPEG:-}}"
EPOCHS="${SD_JAX_GPU_EPOCHS:-15}"
RESULTS="${OUT:-${SD_JAX_GPU_OUT:-$ROOT/runs/gpu_run_$(date -u +%Y%m%dT%H%M%SZ)}}"
WORK="${SD_JAX_GPU_WORK:-/tmp/sd_jax_gpu_run}"

fail() { echo "gpu_run: error: $2" >&2; exit "$1"; }

if [ -z "$ARCHIVE" ]; then
  fail 2 "no CIFAR-10 JPEG archive: pass its path (scripts/gpu_run.sh cifar10-jpeg.tar.gz) or set SD_JAX_CIFAR10_JPEG"
fi
[ -f "$ARCHIVE" ] || fail 2 "CIFAR-10 JPEG archive $ARCHIVE does not exist; pass the .tar.gz with train/<class>/*.jpg"
ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")"
case "$EPOCHS" in ''|*[!0-9]*|0) fail 2 "SD_JAX_GPU_EPOCHS=$EPOCHS is not a positive integer" ;; esac
mkdir -p "$RESULTS" "$WORK"
exec > >(tee "$RESULTS/gpu_run.log") 2>&1

PHASES=""
phase() {  # phase NAME COMMAND...: run it, record its seconds in gpu_run.json's phases (errexit is off
  # inside the command, so the functions it calls return on their first failure themselves)
  local name="$1" t0 rc
  shift
  echo "== $name: $*"
  t0=$(date +%s)
  rc=0
  "$@" || rc=$?
  PHASES="$PHASES\"$name\": {\"seconds\": $(( $(date +%s) - t0 )), \"exit_code\": $rc}, "
  echo "== $name: $(( $(date +%s) - t0 )) s, exit code $rc; $(( $(date +%s) - START )) s since the start"
  [ "$rc" -eq 0 ] || fail "$rc" "phase $name failed (exit code $rc); its output is above"
}

echo "== machine"
date -u
uname -a
nproc
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
else
  echo "nvidia-smi: not found"
fi

if [ "${SD_JAX_SETUP_VENV:-0}" = 1 ]; then
  # shellcheck source=scripts/venv.sh
  source "$ROOT/scripts/venv.sh"
  JAX_PIN="$(grep '^jax==' "$ROOT/requirements.txt" | cut -d= -f3)"
  "$ROOT/.venv/bin/python" -m pip install --quiet "jax[cuda12]==$JAX_PIN"
fi
if [ -n "${SD_JAX_PYTHON:-}" ]; then
  PY="$SD_JAX_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3)" || fail 4 "no python3 on the PATH; set SD_JAX_PYTHON"
fi
if [ -n "${SD_JAX_WHEELS:-}" ]; then
  ls "$SD_JAX_WHEELS"/*.whl >/dev/null 2>&1 || fail 4 "SD_JAX_WHEELS=$SD_JAX_WHEELS holds no .whl files"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$WORK/site" "$SD_JAX_WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "python: $PY ($("$PY" --version 2>&1))"

"$PY" - <<'EOF' || exit $?
import importlib.util
import sys

missing = [name for name in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "tensorflow_datasets",
                             "tensorboardX", "PIL", "etils") if importlib.util.find_spec(name.split(".")[0]) is None]
if missing:
    sys.exit(f"gpu_run: error: this Python lacks {', '.join(missing)}; carry them as wheels in a folder named by "
             "SD_JAX_WHEELS (see the top of scripts/gpu_run.sh), or point SD_JAX_PYTHON at a venv that has them")
import jax

print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
if jax.default_backend() != "gpu":
    print(f"gpu_run: error: JAX sees no GPU (backend {jax.default_backend()!r}); run this on a machine with an "
          "NVIDIA GPU and a CUDA jax (the device image's python3, or SD_JAX_SETUP_VENV=1 where a package index "
          "is reachable)", file=sys.stderr)
    sys.exit(3)
EOF

summary() {  # gpu_run.json: the phases run so far (also after a failed one) and the total
  cat > "$RESULTS/gpu_run.json" <<EOF
{"phases": {${PHASES%, }}, "total_seconds": $(( $(date +%s) - START )), "epochs": $EPOCHS, "paper_epochs": 200,
 "schedule": "the first $EPOCHS epochs of the 200-epoch reference schedule", "python": "$PY", "archive": "$ARCHIVE"}
EOF
}
trap summary EXIT
export PYTHONUNBUFFERED=1
bench() {  # bench DTYPE: the train-step benchmark's JSON line into bench_DTYPE.json
  "$PY" -m experiments.bench_train_step --models=resnet20,resnet18 --repeats=10 --dtype="$1" --json \
    | tee "$WORK/bench_$1.log" || return $?
  tail -n 1 "$WORK/bench_$1.log" > "$RESULTS/bench_$1.json"
}
phase bench_float32 bench float32
phase bench_bfloat16 bench bfloat16
phase prepare "$PY" -m sd_jax.data.prepare cifar10_jpeg --source "$ARCHIVE" --data_dir "$WORK/data"

train() {  # train NAME CONFIG_ARGUMENT: a from-scratch run; its summary and metrics into RESULTS/NAME
  rm -rf "${WORK:?}/$1"
  "$PY" -m launch.main --mode=train --config="experiments/configs/paper.py:$2" --workdir="$WORK/$1" \
    --config.data_dir="$WORK/data" --config.optim.stop_epoch="$EPOCHS" || return $?
  mkdir -p "$RESULTS/$1" || return $?
  cp "$WORK/$1/summary.json" "$WORK/$1/metrics.jsonl" "$RESULTS/$1/"
}
phase train_dense train dense cifar10_jpeg,resnet20,dense
phase train_sd train sd cifar10_jpeg,resnet20,sd_scratch,tuned

echo "== done in $(( $(date +%s) - START )) s; results in $RESULTS"
