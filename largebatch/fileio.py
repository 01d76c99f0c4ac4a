"""Writes that cannot tear: a file or folder appears under its name complete, or not at all.

Everything a run, a cache or a report writes for others to read goes through these: the content is
written under a temporary name in the same folder and renamed into place (``os.replace`` is atomic on
POSIX filesystems), so a crash, a full disk or a kill leaves the previous version or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
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


FULL_HASH_MAX_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by SAMPLE_CHUNKS chunks
SAMPLE_CHUNKS = 16
SAMPLE_CHUNK_BYTES = 1 << 20


def file_fingerprint(path: str | Path) -> list:
    """``[size, mtime_ns, content hash]`` of a file, for keying caches on their inputs: a same-size edit
    whose old mtime was restored (``touch -r``, ``rsync -t``, a checkout) still changes the key.

    Files up to ``FULL_HASH_MAX_BYTES`` are hashed whole (blake2b: the bundled corpus's 16 MB in under
    0.1 s); larger ones by ``SAMPLE_CHUNKS`` chunks of ``SAMPLE_CHUNK_BYTES`` at fixed offsets spread
    over the file (the first and the last included) plus the size, so keying a 100 GB corpus reads 16 MiB
    (an edit between those chunks that also keeps the size and the mtime is not seen). Nothing is memoised:
    a hash kept by stat fields could be stale for exactly such an edit."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, content_hash(Path(path), st.st_size)]


def content_hash(path: Path, size: int | None = None) -> str:
    """blake2b of a file: whole up to ``FULL_HASH_MAX_BYTES``, else sampled (see :func:`file_fingerprint`)."""
    size = os.stat(path).st_size if size is None else size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: f.read(SAMPLE_CHUNK_BYTES), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(f"sampled:{size}".encode())
        last = size - SAMPLE_CHUNK_BYTES
        for i in range(SAMPLE_CHUNKS):
            f.seek(last * i // (SAMPLE_CHUNKS - 1))
            digest.update(f.read(SAMPLE_CHUNK_BYTES))
    return "s" + digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
