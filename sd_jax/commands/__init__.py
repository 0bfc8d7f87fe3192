"""What the launcher's modes call, as importable functions: `decompose`, `analyze`, `export`, `evaluate`.

Each takes a config that describes a run (the one schema of every mode: `model`, `input`, `sd`, and
`cost` for analyze) and any parameter file: a dense or SD `.npz`, a dense or SD Orbax training
checkpoint, or the output of `decompose`.
"""

from sd_jax.commands.analyze import analyze
from sd_jax.commands.decompose import decompose
from sd_jax.commands.evaluate import evaluate
from sd_jax.commands.export import export

__all__ = ["analyze", "decompose", "evaluate", "export"]
