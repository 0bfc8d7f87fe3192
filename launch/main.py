"""sd_jax command line: parses flags and hands over to the library.

    python -m launch.main --mode=decompose --params=model.npz [--output=sd.npz] [--json]

Modes: decompose (every kernel of a saved parameter tree -> SD form, per-layer report).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs", "decompose.py")

MODES = ("decompose",)
_MODE = flags.DEFINE_enum("mode", "decompose", MODES, "What to run.")
_PARAMS = flags.DEFINE_string("params", None, "Parameter tree to read: an .npz or an Orbax checkpoint directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the SD variables (.npz file or Orbax directory).")
_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _MODE.value == "decompose":
        if not _PARAMS.value:
            raise app.UsageError("--mode=decompose needs --params=PATH (an .npz or an Orbax checkpoint)")
        try:
            print(run_decompose(_CONFIG.value, _PARAMS.value, _OUTPUT.value, _JSON.value))
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
