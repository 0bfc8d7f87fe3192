#!/usr/bin/env bash
# Set up .venv and run the main job: the quickstart (Fashion-MNIST: dense ResNet-20 -> decompose ->
# SD fine-tune with the bucket-switch update), about 10 minutes on 2 CPU cores.
# Extra arguments go to the quickstart, e.g. ./run_main.sh --workdir=runs/qs2 --config.optim.epochs=1 \
#   --sd_config.optim.epochs=1   (--config: the dense run, --sd_config: the SD run)
source "$(dirname "$0")/scripts/venv.sh"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } \
    || echo "could not install the Debian package dataset-fashion-mnist; falling back to TFDS's fashion_mnist"
fi
exec python -m experiments.quickstart "$@"
