"""Prepare a dataset as ArrayRecord so that the pipelines can read it without TensorFlow.

    python -m sd_jax.data.prepare fashion_mnist_idx            # offline, from the Debian package
    python -m sd_jax.data.prepare cifar10_jpeg --source cifar10-jpeg.tar.gz
    python -m sd_jax.data.prepare cifar10                      # built-in TFDS name: internet + TensorFlow

`--data_dir` (default: `SD_JAX_DATA_DIR`, else TFDS's default folder) is where the prepared data go.
Preparing is idempotent: a prepared dataset is left as it is.
"""

from __future__ import annotations

import argparse
import sys

from sd_jax.data import builders, registry


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=registry.names())
    parser.add_argument("--data_dir", default=None, help="where prepared datasets live")
    parser.add_argument("--source", default=None, help="offline copy: IDX folder or JPEG .tar.gz")
    args = parser.parse_args(argv)
    try:
        path = builders.prepare(args.name, data_dir=args.data_dir, source=args.source)
    except (builders.SourceNotFoundError, ModuleNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.name} prepared in {path}")


if __name__ == "__main__":
    main()
