"""Atomic file output: a reader sees either the old file or the complete new one, never a part.

Files are written to a temporary name in the same directory (created with their final
permissions, so a secret is never world-readable even for a moment), fsynced, renamed over the
target and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from radmark.errors import InputError


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, the file created with ``mode`` (not chmod'ed after)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    fsync_dir(path.parent)


def read_regular_file(path: Path, max_bytes: int = 256 * 1024 * 1024) -> bytes:
    """Read a regular file without following a final symlink; refuse anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(
            f"{path}: cannot open ({exc.strerror}; symbolic links are refused)"
        ) from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise InputError(f"{path}: too large ({st.st_size} bytes)")
        return fh.read()
