#!/usr/bin/env bash
# Set up .venv and run the main job: the whole-network decomposition benchmark (ResNet-50, ResNet-18).
# Extra arguments go to the benchmark, e.g. ./run_main.sh --json --numpy_fraction=0.25
source "$(dirname "$0")/scripts/venv.sh"
exec python -m experiments.bench_decompose "$@"
