"""Atomic file output: a reader sees either the old file or the complete new one, never a part.

Files are written to a temporary name in the same directory (created with their final
permissions, so a secret is never world-readable even for a moment), fsynced, renamed over the
target and the directory fsynced.

Nothing a user names is replaced silently (issue #12): a command that writes a file checks its
target first (:func:`check_new_target`, before any work) and writes it with ``overwrite=False``
unless ``--force`` was given, which links the finished temp file into place (``link`` fails on an
existing name, so a file that appeared in the meantime is not replaced either).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from radmark.errors import InputError


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class TargetExistsError(InputError):
    """A file would be replaced without ``--force``."""

    def __init__(self, path: Path, what: str = "") -> None:
        what = f"{what} " if what else ""
        super().__init__(f"{what}{path} already exists; pass --force to replace it")


#: The type fields of a radmark owner key file and keystore secret (keys/sealing.py): canonical
#: JSON objects of a few KB.
_SECRET_TYPES = (b'"type":"radmark.keyfile"', b'"type":"radmark.secret"')


def holds_a_secret(path: Path) -> bool:
    """Whether ``path`` is a radmark owner key file or keystore secret (read: its first 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"{") and any(t in head for t in _SECRET_TYPES)


def check_new_target(
    path: Path,
    *,
    force: bool,
    what: str = "",
    inputs: Iterable[str | os.PathLike[str]] | Callable[[], Iterable[str | os.PathLike[str]]] = (),
    may_replace_secret: bool = False,
) -> None:
    """Refuse, before any work, a target that exists (unless ``force``) or cannot be a file.

    A directory or a non-regular file is refused even with ``force``; so is a missing parent
    directory (named, so the user knows which ``mkdir`` to run). Even with ``force`` a command
    never writes over one of its own ``inputs`` (the same file by inode, whatever the path's
    spelling; the caller lists the files a ``pipe:`` command names; a callable is called only
    when ``force`` meets an existing target, so nothing is read before a plain refusal) nor over
    a radmark secret key, which nothing but a new key (``may_replace_secret``: ``keygen --out
    --force``) replaces.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise InputError(f"{label} is a directory; give a file name")
        if not force:
            raise TargetExistsError(path, what)
        if not os.path.isfile(path) or os.path.islink(path):
            raise InputError(f"{label} exists and is not a regular file; refusing to replace it")
        for item in inputs() if callable(inputs) else inputs:
            with contextlib.suppress(OSError):
                if os.path.isfile(item) and os.path.samefile(path, item):
                    raise InputError(
                        f"{label} is one of this command's inputs ({os.fspath(item)}); radmark "
                        "never writes over an input, even with --force"
                    )
        if not may_replace_secret and holds_a_secret(path):
            raise InputError(
                f"{label} holds a radmark secret key; radmark never replaces one with another "
                "kind of file, even with --force (move it away yourself if you mean it)"
            )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{label}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{label}: directory {parent} is not writable")


def place_file(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Move the finished temp file ``tmp`` to ``path`` (an existing ``path`` is kept unless
    ``overwrite``: link + unlink is atomic and fails on an existing name)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise TargetExistsError(path) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
            raise TargetExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write_bytes(
    path: Path, data: bytes, mode: int = 0o644, *, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically, the file created with ``mode`` (not chmod'ed after).

    ``overwrite=False`` refuses an existing ``path`` (:class:`TargetExistsError`), checked
    atomically when the file is put in place.
    """
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
        place_file(tmp, path, overwrite=overwrite)
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(
            f"{path}: cannot open ({exc.strerror}; symbolic links are refused)"
        ) from exc
    try:
        st = os.fstat(fd)  # before fdopen, which refuses a directory with its own error
    except OSError as exc:
        os.close(fd)
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file")
    if st.st_size > max_bytes:
        os.close(fd)
        raise InputError(f"{path}: too large ({st.st_size} bytes)")
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
