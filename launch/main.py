"""sd_jax command line: parses flags and hands over to the library (`sd_jax.train.trainer`, `sd_jax.commands`).

    python -m launch.main --mode=train --config=experiments/configs/default.py --workdir=runs/x
    python -m launch.main --mode=decompose --params=model.npz [--output=sd.npz] [--json]
    python -m launch.main --mode=analyze [--model=resnet20] [--params=PATH] [--format=markdown] [--plots=DIR]
    python -m launch.main --mode=analyze --config=CONFIG_OF_THE_RUN --params=runs/x/checkpoints \
        --json --output=runs/x/energy.json
    python -m launch.main --mode=export --params=PATH --output=model.sdpack [--integer_calibration=500]
    python -m launch.main --mode=evaluate --config=CONFIG_OF_THE_RUN (--workdir=runs/x | --params=PATH)

One config format serves every mode (default: experiments/configs/default.py): its `model` and `input`
sections name the model and its input, its `sd` section the SD layers and options. `--params` takes a
dense or SD `.npz`, an Orbax checkpoint (a training run's `checkpoints` directory) or the output of
`--mode=decompose`; `--model` analyzes or exports another zoo model than the config's. Missing folders
of `--output`, `--plots` and `--workdir` are created; a filesystem failure (disk full, read-only,
permission denied) ends the run with one line naming the path and the fix.

Modes: train / finetune (`sd_jax.train.trainer`); evaluate (the latest checkpoint of --workdir, or
--params); decompose (every kernel the `sd` rules select -> SD variables and a per-layer report);
analyze (energy and storage, dense and SD side by side); export (checkpoint -> packed SD file, and
with --integer_calibration its integer-only form beside it, model.int.npz).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs", "default.py")

MODES = ("train", "finetune", "evaluate", "decompose", "analyze", "export")
TRAINING_MODES = ("train", "finetune")
_MODE = flags.DEFINE_enum("mode", "decompose", MODES, "What to run.")
_PARAMS = flags.DEFINE_string("params", None, "Variables to read: a dense or SD .npz, an Orbax checkpoint (a run's checkpoints directory) or a decompose output.")
_OUTPUT = flags.DEFINE_string("output", None, "decompose: where to write the SD variables (.npz file or Orbax "
                              "directory); analyze: where to write the report (instead of printing it); export: the packed file.")
_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
_MODEL = flags.DEFINE_string("model", None, "analyze / export: another zoo model than the config's, e.g. resnet20.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "markdown", "json", "csv"], "analyze: report format.")
_PLOTS = flags.DEFINE_string("plots", None, "analyze: directory for PNG plots.")
_INTEGER_CALIBRATION = flags.DEFINE_integer(
    "integer_calibration", 0, "export: also write the integer-only model (model.sdpack -> model.int.npz), "
    "calibrated on this many training images of the config's dataset (in order, not augmented); 0: none.")
_WORKDIR = flags.DEFINE_string("workdir", None, "train / finetune / evaluate (without --params): checkpoints, metrics, summary.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Several processes: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Several processes: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Several processes: this one's index.")
_DISTRIBUTED_AUTO = flags.DEFINE_bool("distributed_auto", False, "Detect the cluster (SLURM, TPU pod) for jax.distributed.")
try:  # ml_collections reads --config.x overrides from sys.argv while the flag is defined
    _CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG), "Config file.")
except (AttributeError, KeyError) as _error:
    sys.exit(f"error: config key {_error} does not exist in the config file; check the spelling "
             "against the file (--config=PATH) or add the key there")


def _print_result(result: dict) -> None:
    width = max(map(len, result))
    print("\n".join(f"{key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}"
                    for key, value in result.items()))


def _exit_with(error: Exception, path: str | None = None) -> None:
    """Print `error` as one `error: ...` line (a filesystem failure names its path and the fix); exit 2."""
    if isinstance(error, OSError) and error.errno is not None:
        where = error.filename or path or "the file system"
        fixes = {
            errno.ENOSPC: "no space left on the device; free space or pass a path on another disk",
            errno.EACCES: "permission denied; pass a path you can write to, or change its permissions",
            errno.EPERM: "permission denied; pass a path you can write to, or change its permissions",
            errno.EROFS: "the file system is read-only; pass a path on a writable one",
            errno.EEXIST: "a file is in the way where a directory is needed; pass a directory path",
            errno.ENOTDIR: "a file is in the way where a directory is needed; pass a directory path",
            errno.ENOENT: "no such file or directory; check the path, or create its parent folder",
        }
        error = f"{where}: {fixes.get(error.errno, error.strerror or error)}"
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def _run_training(mode: str, config, workdir: str | None) -> None:
    """train (dense, or SD from scratch with model.sd), finetune (init.from_params: decompose a
    dense checkpoint, then train in SD form) or evaluate the latest checkpoint in `workdir`."""
    if not workdir:
        raise app.UsageError(f"--mode={mode} needs --workdir=DIR (checkpoints, metrics and summary go there)")
    if "optim" not in config:
        raise app.UsageError(f"--mode={mode} needs a training config: --config=experiments/configs/default.py "
                             "or an experiment config")
    if mode == "finetune" and not config.init.from_params:
        raise app.UsageError("--mode=finetune needs --config.init.from_params=PATH (a dense checkpoint)")
    from sd_jax.train import distributed, trainer

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_DISTRIBUTED_AUTO.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None

    try:
        if mode == "evaluate":
            result = trainer.evaluate(config, workdir)
        else:
            result = trainer.train_and_evaluate(config, workdir)
    except (ValueError, OSError, trainer.TrainingError) as error:
        _exit_with(error, workdir)
    _print_result(result)


def _run_command(mode: str, config) -> None:
    """decompose, analyze, export or evaluate --params: print the report, or write it to --output (analyze)."""
    from sd_jax import commands  # imported only by the modes that need it: slow to import
    from sd_jax import io as sd_io

    try:
        if mode == "decompose":
            text = commands.decompose(config, _PARAMS.value, _OUTPUT.value, as_json=_JSON.value)
        elif mode == "analyze":
            text = commands.analyze(config, _PARAMS.value, model_name=_MODEL.value, plots_dir=_PLOTS.value,
                                    output_format="json" if _JSON.value else _FORMAT.value)
        elif mode == "export":
            text = commands.export(config, _PARAMS.value, _OUTPUT.value, model_name=_MODEL.value,
                                   integer_calibration=_INTEGER_CALIBRATION.value)
        else:
            _print_result(commands.evaluate(config, _PARAMS.value))
            return
        if mode == "analyze" and _OUTPUT.value:
            sd_io.atomic_write_text(_OUTPUT.value, text + "\n")
            return
    except (ValueError, OSError) as error:  # bad input or a filesystem failure: what and how to fix it, no traceback
        _exit_with(error, _OUTPUT.value)
    print(text)


def _without_closed_loop_noise(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """`hook` for unraisable exceptions, less TensorStore's "Event loop is closed" ones: when a checkpoint
    write fails (a full disk), Orbax closes its event loop while other writes are still finishing, and
    their callbacks raise this once each; the failure itself ends the run as one line."""
    def unraisable(info: Any) -> None:
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            hook(info)
    return unraisable


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every save at INFO
        logging.set_verbosity(logging.WARNING)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    mode = _MODE.value
    from sd_jax.train.config_check import check_config  # imported here: it imports JAX

    try:
        check_config(_CONFIG.value)
    except ValueError as error:  # a bad config value: refused before any work starts
        _exit_with(error)
    if mode in TRAINING_MODES or (mode == "evaluate" and not _PARAMS.value):
        _run_training(mode, _CONFIG.value, _WORKDIR.value)
        return
    if mode != "analyze" and not _PARAMS.value:
        raise app.UsageError(f"--mode={mode} needs --params=PATH (an .npz or an Orbax checkpoint)")
    if mode == "export" and not _OUTPUT.value:
        raise app.UsageError("--mode=export needs --output=FILE for the packed model")
    _run_command(mode, _CONFIG.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a config key that does not exist reported as one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as error:
        print(f"error: {error}; run with --helpfull for the flags, or read the config file for its keys",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
