"""Writes that cannot tear: a file or folder appears under its name complete, or not at all.

Everything a run, a cache or a report writes for others to read goes through these: the content is
written under a temporary name in the same folder and renamed into place (``os.replace`` is atomic on
POSIX filesystems), so a crash, a full disk or a kill leaves the previous version or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """``with atomic_file(path, "wb") as f:`` write ``f``; it becomes ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a record is as readable as any other file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp:`` fill ``tmp``; on success it becomes ``final`` (replacing an older
    one), on an exception it is removed and ``final`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(complete: Path, path: Path) -> None:
    """Move the folder ``complete`` to ``path``; an older ``path`` is set aside first and removed last, so
    one complete copy exists at every moment."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(complete, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
