"""Writing WebDataset shards reproducibly and atomically.

The same samples always give byte-identical files (fixed owner, mode, mtime, ustar format), so
their hashes can be recorded and checked later; a shard is written to a temp name, fsynced and
renamed, so a crash never leaves a half-written shard under its final name.

A shard keeps the compression its name says (``.tar.gz``/``.tgz``: gzip, ``.tar.xz``/``.txz``:
xz, ``.tar.bz2``/``.tbz2``/``.tbz``: bzip2; ``data/samples.py``), so output shard i has input
shard i's name and format. Compressed output is reproducible too: gzip with level 6, mtime 0, no
file name and OS byte 255; xz with preset 6 and a CRC64 check; bzip2 with level 9 — the same
bytes for the same samples with the same compression library (zlib, liblzma, libbz2 versions can
differ in their output; a resumed run compares its own output's hash, never another machine's)."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import secrets
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radmark.data.images import encode_png
from radmark.data.samples import Sample, compression_of, unsafe_name

#: Compressor settings: fixed, so the same samples give the same bytes (module docstring).
GZIP_LEVEL = 6
XZ_PRESET = 6
BZ2_LEVEL = 9


@dataclass(frozen=True)
class ShardWriteResult:
    """What was written: the final path, the SHA-256 of its bytes, sample count and size."""

    path: Path
    sha256: str
    samples: int
    bytes: int


class _HashingWriter:
    """File-like sink that hashes and counts what tarfile writes, so the file is never re-read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.hash.update(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


def _compressor(compression: str | None, sink: _HashingWriter) -> Any:
    """A write-only stream that compresses into ``sink`` (or ``sink`` itself for a plain tar)."""
    if compression == "gz":
        return gzip.GzipFile(
            filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=sink, mtime=0
        )
    if compression == "xz":
        raw: Any = sink  # a file-like sink; the stubs want IO[bytes]
        return lzma.LZMAFile(
            raw, mode="wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET
        )
    if compression == "bz2":
        return bz2.BZ2File(sink, mode="wb", compresslevel=BZ2_LEVEL)
    return sink


def _check_sample_for_write(sample: Sample) -> None:
    """Refuse samples that would not read back as the same key/extension pairs."""
    key = sample.key
    problem = unsafe_name(key)
    if problem is not None or "." in key.rpartition("/")[2] or not key.rpartition("/")[2]:
        raise ValueError(f"invalid sample key {key!r} for a WebDataset shard")
    exts: set[str] = set()
    for ext, _ in sample.members:
        if not ext or "/" in ext or "\\" in ext or ext in exts:
            raise ValueError(f"invalid or repeated extension {ext!r} in sample {key!r}")
        exts.add(ext)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform; the rename itself is still atomic
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardWriteResult:
    """Write samples to a reproducible tar shard at ``path``, atomically.

    Members are named ``KEY.EXT`` with fixed owner, mode and mtime and the ustar format (GNU only
    for names ustar cannot hold), so the same samples always give the same bytes; the tar is
    compressed as ``path``'s name says (module docstring). Names that are not valid UTF-8 keep
    their bytes (surrogate escapes, as they were read). The data goes to
    a hidden temp file in the same directory which is fsynced and renamed over ``path``; on any
    error (including one raised by ``samples``) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    count = 0
    seen: set[str] = set()
    try:
        sink = _HashingWriter(fd)
        stream = _compressor(compression_of(path.name), sink)
        tf = tarfile.TarFile(
            fileobj=stream,  # write/tell/flush is all tarfile needs
            mode="w",
            format=tarfile.USTAR_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        for sample in samples:
            _check_sample_for_write(sample)
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r}")
            seen.add(sample.key)
            for ext, data in sample.members:
                info = _tarinfo(f"{sample.key}.{ext}", len(data))
                try:
                    info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
                    tf.format = tarfile.USTAR_FORMAT
                except ValueError:
                    tf.format = tarfile.GNU_FORMAT  # name too long for ustar
                tf.addfile(info, io.BytesIO(data))
            count += 1
        tf.format = tarfile.USTAR_FORMAT
        tf.close()
        if stream is not sink:
            stream.close()  # the compressor's trailer; the sink's fd stays open
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return ShardWriteResult(path=path, sha256=sink.hash.hexdigest(), samples=count, bytes=sink.size)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so shards of any size fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(
    images: np.ndarray,
    labels: Sequence[int],
    outdir: Path,
    *,
    prefix: str = "data",
    samples_per_shard: int = 1000,
    extra: Callable[[int], dict[str, bytes]] | None = None,
    suffix: str = ".tar",
) -> list[Path]:
    """Write arrays as WebDataset shards ``{prefix}-{j:06d}{suffix}`` (PNG image + ASCII label).

    This is how tests and benchmarks make datasets, so it goes through :func:`write_shard` and is
    reproducible too. ``extra(i)`` adds members to sample ``i``; ``suffix`` (``.tar.gz``, ...)
    picks the compression.
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3):
        raise ValueError(
            f"images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {arr.shape}"
        )
    n = arr.shape[0]
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    def make(i: int) -> Sample:
        label = int(labels[i])
        if label < 0:
            raise ValueError(f"label {label} of sample {i} is negative")
        members = [("png", encode_png(arr[i])), ("cls", str(label).encode("ascii"))]
        if extra is not None:
            for ext, data in extra(i).items():
                if ext in ("png", "cls"):
                    raise ValueError(f"extra member {ext!r} would replace the image or label")
                members.append((ext, bytes(data)))
        return Sample(f"{i:08d}", members)

    paths: list[Path] = []
    for j, start in enumerate(range(0, n, samples_per_shard)):
        stop = min(n, start + samples_per_shard)
        result = write_shard(
            outdir / f"{prefix}-{j:06d}{suffix}", (make(i) for i in range(start, stop))
        )
        paths.append(result.path)
    return paths
