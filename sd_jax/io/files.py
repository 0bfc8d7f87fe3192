"""Files on any `etils.epath` backend (local disks, `gs://` buckets): atomic writes of bytes and text.

An atomic write goes to a temporary sibling of the target and is then renamed over it, so a reader
sees the old file or the new one, never half of one (on a bucket the rename is a copy and a delete:
readers still see a whole object).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import IO, Any

from etils import epath

PathLike = str | epath.PathLike


def as_path(path: PathLike) -> epath.Path:
    """`path` as an absolute `epath.Path` (a local path, made absolute, or a URL such as gs://bucket/run)."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def atomic_write(path: PathLike, write: Callable[[IO[Any]], Any], *, mode: str = "wb") -> None:
    """Call `write(stream)` on a temporary sibling of `path` (opened with `mode`), then rename it over `path`.

    Missing parent folders are created; the file gets the permissions the umask leaves (0666 & ~umask),
    as any file the process opens. An OSError names `path`, not the temporary (or no file, as a failed write).
    """
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with temporary.open(mode) as stream:
            write(stream)
        temporary.replace(target)
    except BaseException as error:
        if temporary.exists():
            temporary.unlink()
        if isinstance(error, OSError) and error.errno is not None and error.filename in (None, str(temporary)):
            raise OSError(error.errno, error.strerror, str(target)) from None  # the file meant, not its stand-in
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """`text` written atomically to `path` (reports, summaries)."""
    atomic_write(path, lambda stream: stream.write(text), mode="w")
