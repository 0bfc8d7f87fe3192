"""Every script under experiments/ imports beside every other (tests and notebooks import several into
one process; two that defined the same absl flag could not), and the shared --models / --batch flags
fall back to each benchmark's own default."""

import importlib
import pathlib

from absl import flags

from experiments import benchmarking

SCRIPTS = sorted(path.stem for path in (pathlib.Path(__file__).parents[2] / "experiments").glob("*.py")
                 if path.stem != "__init__")


def test_every_experiment_script_imports_beside_the_others():
    for name in SCRIPTS:
        importlib.import_module(f"experiments.{name}")


def test_shared_flags_fall_back_to_the_benchmark_default(monkeypatch):
    importlib.import_module("experiments.bench_memory")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    assert benchmarking.models(("resnet20",)) == ["resnet20"] and benchmarking.batch(128) == 128
    monkeypatch.setattr(flags.FLAGS, "models", ["vgg16"])
    monkeypatch.setattr(flags.FLAGS, "batch", 8)
    assert benchmarking.models(("resnet20",)) == ["vgg16"] and benchmarking.batch(128) == 8
