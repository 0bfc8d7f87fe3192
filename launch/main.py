"""sd_jax command line: parses flags and hands over to the library.

    python -m launch.main --mode=decompose --params=model.npz [--output=sd.npz] [--json]

    python -m launch.main --mode=analyze --model=resnet20 [--params=PATH] [--format=markdown] [--plots=DIR]
    python -m launch.main --mode=analyze --config=CONFIG_OF_AN_SD_RUN --model=resnet20 \
        --params=runs/x/checkpoints --json --output=runs/x/energy.json   # the run's trained SD weights
    python -m launch.main --mode=export --model=resnet20 --params=PATH --output=model.sdpack

    python -m launch.main --mode=train --config=experiments/configs/default.py --workdir=runs/x

Modes: train / finetune / evaluate (see `sd_jax.train.trainer`); decompose (every kernel of a saved parameter tree -> SD form, per-layer report); analyze
(energy and storage, dense and SD side by side); export (checkpoint -> packed SD file).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs", "decompose.py")

MODES = ("train", "finetune", "evaluate", "decompose", "analyze", "export")
TRAINING_MODES = ("train", "finetune", "evaluate")
_MODE = flags.DEFINE_enum("mode", "decompose", MODES, "What to run.")
_PARAMS = flags.DEFINE_string("params", None, "Parameter tree to read: an .npz or an Orbax checkpoint directory.")
_OUTPUT = flags.DEFINE_string("output", None, "decompose: where to write the SD variables (.npz file or Orbax "
                              "directory); analyze: where to write the report (instead of printing it).")
_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
_MODEL = flags.DEFINE_string("model", None, "analyze / export: zoo model name, e.g. resnet20.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "markdown", "json", "csv"], "analyze: report format.")
_PLOTS = flags.DEFINE_string("plots", None, "analyze: directory for PNG plots.")
_WORKDIR = flags.DEFINE_string("workdir", None, "train / finetune / evaluate: checkpoints, metrics, summary.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Several processes: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Several processes: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Several processes: this one's index.")
_DISTRIBUTED_AUTO = flags.DEFINE_bool("distributed_auto", False, "Detect the cluster (SLURM, TPU pod) for jax.distributed.")
try:  # ml_collections reads --config.x overrides from sys.argv while the flag is defined
    _CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG), "Config file.")
except (AttributeError, KeyError) as _error:
    sys.exit(f"error: config key {_error} does not exist in the config file; check the spelling "
             "against the file (--config=PATH) or add the key there")


def run_decompose(config, params_path: str, output: str | None, as_json: bool) -> str:
    """Decompose every kernel at `params_path`; return the report (table or JSON)."""
    from sd_jax.core import report
    from sd_jax.core.network import decompose_network
    from sd_jax.train import checkpoint

    options = dict(config.sd.to_dict())
    rules = [tuple(rule) for rule in options.pop("rules")]
    max_kernel_size = options.pop("max_kernel_size")
    params = checkpoint.load_params(params_path)
    result = decompose_network(params, rules, max_kernel_size=max_kernel_size, **options)
    if output:
        checkpoint.save_decomposition(output, result)
    if as_json:
        return report.to_json(result.reports, result.dense_params)
    return report.format_table(result.reports, result.dense_params)


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
    except (ValueError, FileNotFoundError, trainer.TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    width = max(map(len, result))
    print("\n".join(f"{key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}"
                    for key, value in result.items()))


def _input_geometry(config) -> dict[str, int]:
    """analyze with a training config: its dataset's image size, channels and classes; {} otherwise."""
    if "input" not in config:
        return {}
    from sd_jax.data import registry

    spec = registry.get(config.input.dataset)
    return dict(image_size=spec.image_size, channels=spec.channels, num_classes=spec.num_classes)


def _cost_commands():
    from sd_jax.cost import commands  # imported only by the modes that need it: slow to import

    return commands


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every save at INFO
        logging.set_verbosity(logging.WARNING)
    if _MODE.value in TRAINING_MODES:
        _run_training(_MODE.value, _CONFIG.value, _WORKDIR.value)
        return
    if _MODE.value != "analyze" and not _PARAMS.value:
        raise app.UsageError(f"--mode={_MODE.value} needs --params=PATH (an .npz or an Orbax checkpoint)")
    if _MODE.value != "decompose" and not _MODEL.value:
        raise app.UsageError(f"--mode={_MODE.value} needs --model=NAME (a zoo model, e.g. resnet20)")
    if _MODE.value == "export" and not _OUTPUT.value:
        raise app.UsageError("--mode=export needs --output=FILE for the packed model")
    runs = dict(
        decompose=lambda: run_decompose(_CONFIG.value, _PARAMS.value, _OUTPUT.value, _JSON.value),
        analyze=lambda: _cost_commands().run_analyze(_CONFIG.value, _MODEL.value, _PARAMS.value, plots_dir=_PLOTS.value,
                                             output_format="json" if _JSON.value else _FORMAT.value,
                                             **_input_geometry(_CONFIG.value)),
        export=lambda: _cost_commands().run_export(_CONFIG.value, _MODEL.value, _PARAMS.value, _OUTPUT.value),
    )
    try:
        text = runs[_MODE.value]()
        if _MODE.value == "analyze" and _OUTPUT.value:
            from sd_jax.train import checkpoint

            checkpoint.atomic_write_text(_OUTPUT.value, text + "\n")
        else:
            print(text)
    except ValueError as error:  # bad input: say what and how to fix it, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


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
