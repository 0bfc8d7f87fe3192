"""Tests for pyproject.toml: what `pip install -e .` installs and requires, and a launcher that does not
depend on the working directory."""
import os
import re
import subprocess
import sys
import tomllib

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = {"sd_jax", "launch", "experiments"}


def _setuptools_table() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as stream:
        return tomllib.load(stream)["tool"]["setuptools"]


def _pins(files: list[str]) -> dict[str, str]:
    lines = [line.strip() for name in files for line in open(os.path.join(ROOT, name))]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups() for line in lines if line)


def test_every_package_under_the_three_roots_is_installed_and_the_tests_are_not():
    found = set(setuptools.find_packages(ROOT, include=_setuptools_table()["packages"]["find"]["include"]))
    on_disk = {os.path.relpath(folder, ROOT).replace(os.sep, ".") for folder, _, files in os.walk(ROOT)
               if "__init__.py" in files and os.path.relpath(folder, ROOT).split(os.sep)[0] in TOP_LEVEL}
    assert found == on_disk and TOP_LEVEL <= found and "tests" not in found


def test_dependencies_are_pinned_and_the_test_tools_are_an_extra():
    dynamic = _setuptools_table()["dynamic"]
    runtime, test = _pins(dynamic["dependencies"]["file"]), _pins(dynamic["optional-dependencies"]["test"]["file"])
    assert set(test) == {"pytest", "hypothesis", "pytest-xdist", "execnet"} and not set(test) & set(runtime)
    assert {"jax", "flax", "optax", "orbax-checkpoint", "ml-collections"} <= set(runtime)


def test_launcher_help_works_from_another_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)  # what the editable install puts on the path
    done = subprocess.run([sys.executable, "-m", "launch.main", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr  # absl's --help prints the flags and exits with 1
    assert re.search(r"^\s+--mode: ", done.stdout, re.MULTILINE) and not os.listdir(tmp_path)
