"""Reading and writing WebDataset tar shards, safely and reproducibly.

Shards come from users and from the network, so every read path treats them as hostile: members
that could escape a directory, links, devices, truncated streams and images that would exhaust
memory are refused with a one-line :class:`~radmark.errors.ShardError` naming the shard and the
sample, never a traceback. Nothing here extracts to disk; members are read into memory only.

Shards we write must be reproducible (the same samples always give byte-identical files, so their
hashes can be recorded and checked later) and atomic (a crash never leaves a half-written shard
under its final name, which a later run could mistake for a finished one).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import secrets
import signal
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from radmark.errors import InputError, ShardError

__all__ = [
    "IMAGE_EXTS",
    "SHARD_SUFFIXES",
    "Sample",
    "ShardWriteResult",
    "decode_image",
    "encode_png",
    "expand_shards",
    "iter_samples",
    "parse_label",
    "sha256_file",
    "shard_name",
    "write_dataset",
    "write_shard",
]

IMAGE_EXTS: tuple[str, ...] = (
    "png", "jpg", "jpeg", "ppm", "pgm", "pbm", "pnm", "bmp", "webp", "tif", "tiff",
)  # fmt: skip

#: File name endings we recognise as shards (directories are scanned for these).
SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")

#: A single member larger than this is refused: no image we mark needs it, and reading it into
#: memory could take the machine down.
MAX_MEMBER_BYTES: int = 1 << 30

# PIL decoders we allow. Restricting Image.open to the formats behind IMAGE_EXTS keeps exotic
# plugins (EPS shells out to Ghostscript, for instance) away from untrusted bytes.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "TIFF")

# How much of the decompressed tar stream we remember, to check the block where tarfile stopped.
# tarfile reads ahead by at most one record (10 KiB), so this is ample.
_TAIL_KEEP = 1 << 16

_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    ValueError,
)


# --------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    """One WebDataset sample: the members sharing a key, in tar order.

    Members stay raw bytes so that a sample can be copied to an output shard untouched except for
    the members we deliberately replace.
    """

    key: str
    members: list[tuple[str, bytes]]
    # Where the sample came from, only so that errors raised by methods can name the shard.
    shard: str = field(default="<unknown>", compare=False, repr=False)

    def get(self, ext: str) -> bytes | None:
        """The bytes of the member with exactly this extension, or None."""
        for e, data in self.members:
            if e == ext:
                return data
        return None

    def image_ext(self) -> str | None:
        """The extension of the sample's single image member, or None if it has none.

        Several image members make it ambiguous which one to mark, so that is refused rather than
        guessed.
        """
        found = [e for e, _ in self.members if e.lower() in IMAGE_EXTS]
        if len(found) > 1:
            raise ShardError(
                self.shard, f"several image members ({', '.join(found)}); expected one", self.key
            )
        return found[0] if found else None


# --------------------------------------------------------------------------------------------
# Shard lists


def _is_shard_file(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _expand_local(spec: str, original: str) -> list[str]:
    """A local file, or a directory's shards; a missing path is the user's mistake, named."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(
            entry.name
            for entry in os.scandir(path)
            if _is_shard_file(entry.name) and entry.is_file()
        )
        if not found:
            raise InputError(
                f"directory {spec} contains no shards (*.tar, *.tar.gz, *.tgz); "
                "point at the shard files or a directory holding them"
            )
        return [os.path.join(path, name) for name in found]
    if os.path.isfile(path):
        return [path]
    if "://" in spec:
        raise InputError(
            f"{spec}: only local shards and pipe: URLs are supported; try 'pipe:curl -fsSL {spec}'"
        )
    if spec != original:
        raise InputError(f"shard {spec} (from pattern {original}) does not exist")
    raise InputError(f"shard {spec} does not exist")


def expand_shards(specs: Sequence[str]) -> list[str]:
    """Turn user shard specs into a flat list of shard URLs.

    Accepts local shard files, directories (their ``*.tar``, ``*.tar.gz``, ``*.tgz`` files sorted
    by name, not recursive), brace patterns such as ``data-{000000..000009}.tar`` and ``pipe:CMD``
    URLs. Brace patterns are expanded inside ``pipe:`` URLs too (as WebDataset does), so
    ``pipe:curl -s https://host/data-{0..9}.tar`` gives ten commands; the commands themselves
    are not checked here. Duplicates are dropped (first occurrence wins) so a shard is never
    marked or counted twice.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if not spec:
            raise InputError("empty shard path")
        expanded = list(braceexpand(spec)) if "{" in spec else [spec]
        for item in expanded:
            if item.startswith("pipe:"):
                urls = [item]
                identities = [item]
            else:
                urls = _expand_local(item, spec)
                identities = [os.path.realpath(u) for u in urls]
            for url, ident in zip(urls, identities, strict=True):
                if ident not in seen:
                    seen.add(ident)
                    out.append(url)
    if not out:
        raise InputError("no shards given")
    return out


def shard_name(url: str) -> str:
    """The file name an output shard gets for this input shard.

    Output shards keep their input's name so that the marked dataset lines up one to one with the
    original. For a ``pipe:`` URL the name is taken from the command's last argument, which by
    convention is the shard's address.
    """
    if url.startswith("pipe:"):
        tokens = url[len("pipe:") :].split()
        name = tokens[-1].rstrip("/").rsplit("/", 1)[-1] if tokens else ""
        if not _is_shard_file(name) or name in SHARD_SUFFIXES:
            raise InputError(
                f"cannot tell the shard name from {url!r}: its last word should be the shard's "
                "path or URL ending in .tar, .tar.gz or .tgz"
            )
        return name
    name = os.path.basename(url.rstrip("/"))
    if not name:
        raise InputError(f"cannot tell the shard name from {url!r}")
    return name


# --------------------------------------------------------------------------------------------
# Reading


class _Tap:
    """A read-only stream wrapper that counts bytes and remembers the most recent ones.

    tarfile, when streaming, quietly treats a truncated or garbled header after the first member as
    the end of the archive. Remembering the tail of the stream lets us check afterwards that it
    really stopped at a zero block, the only legitimate end.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.pos = 0
        self.tail = bytearray()
        self.tail_start = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.pos += len(data)
            self.tail += data
            excess = len(self.tail) - 2 * _TAIL_KEEP
            if excess > 0:
                cut = len(self.tail) - _TAIL_KEEP
                del self.tail[:cut]
                self.tail_start += cut
        return data

    def block_at(self, offset: int, size: int) -> bytes | None:
        """The bytes [offset, offset+size) if they were read and are still remembered."""
        start = offset - self.tail_start
        if start < 0 or offset + size > self.pos:
            return None
        return bytes(self.tail[start : start + size])


class _Prefixed:
    """Puts back bytes already read (the magic sniffed to pick a decompressor) before a stream."""

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        self.head = head
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.raw.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.raw.read(size)


def _read_exact(raw: IO[bytes], n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = raw.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _decompressed(raw: IO[bytes]) -> Any:
    """Sniff the compression and return a stream of tar bytes.

    We decompress ourselves (rather than tarfile's ``r|*``) so that the stream tarfile reads from
    is the tar itself and :class:`_Tap` can check where it ended.
    """
    head = _read_exact(raw, 6)
    stream: Any = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")
    return stream


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the basename's first dot."""
    dirname, sep, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not ext or not stem:
        raise ValueError(name)
    return dirname + sep + stem, ext


def _unsafe_name(name: str) -> str | None:
    """Why a member name must not be trusted, or None if it is fine."""
    if not name:
        return "member with an empty name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"member {name!r} has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return f"member {name!r} contains a '..' path component"
    return None


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """A name for a member type we refuse, or None for regular files."""
    if member.isreg():
        return None
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return f"unsupported type {member.type!r}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stderr_tail(f: IO[bytes]) -> str:
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 2048))
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return _one_line(lines[-1]) if lines else ""


def _iter_tar(shard: str, raw: IO[bytes]) -> Iterator[Sample]:
    """Group the members of one tar stream into samples, refusing anything unsafe or malformed."""
    last_key: str | None = None

    def fail(problem: str, key: str | None = None) -> ShardError:
        return ShardError(shard, problem, key)

    def corrupt(exc: BaseException, key: str | None) -> ShardError:
        detail = _one_line(str(exc)) or type(exc).__name__
        where = f" after sample {last_key!r}" if key is None and last_key is not None else ""
        return fail(f"truncated or corrupt tar{where} ({detail})", key)

    try:
        tap = _Tap(_decompressed(raw))
        tf = tarfile.open(fileobj=tap, mode="r|")  # noqa: SIM115 - closed by `with tf` below
    except _READ_ERRORS as exc:
        raise corrupt(exc, None) from None

    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    count = 0
    with tf:
        while True:
            try:
                member = tf.next()
            except _READ_ERRORS as exc:
                raise corrupt(exc, None) from None
            if member is None:
                break
            tf.members = []  # stream mode keeps every header otherwise; we never look back
            if member.isdir():
                continue
            name = member.name
            problem = _unsafe_name(name)
            if problem is not None:
                raise fail(problem)
            try:
                mkey, ext = _split_name(name)
            except ValueError:
                raise fail(f"member {name!r} has no extension (expected KEY.EXT)") from None
            kind = _member_kind(member)
            if kind is not None:
                raise fail(f"member {name!r} is a {kind}; only regular files are allowed", mkey)
            if member.size > MAX_MEMBER_BYTES:
                raise fail(f"member {name!r} is too large ({member.size} bytes)", mkey)
            try:
                fobj = tf.extractfile(member)
                data = fobj.read() if fobj is not None else b""
            except _READ_ERRORS as exc:
                raise corrupt(exc, mkey) from None
            if len(data) != member.size:
                raise fail(f"truncated tar: member {name!r} is cut short", mkey)
            if mkey != key:
                if mkey in seen:
                    raise fail("duplicate key: it appears again after other samples", mkey)
                if key is not None:
                    count += 1
                    yield Sample(key, members, shard)
                    last_key = key
                seen.add(mkey)
                key, members = mkey, []
            if any(e == ext for e, _ in members):
                raise fail(f"extension {ext!r} appears twice in the sample", mkey)
            members.append((ext, data))

    # tarfile stops silently at a truncated or garbled header; only a zero block is a real end.
    block = tap.block_at(tf.offset, tarfile.BLOCKSIZE)
    if block is None:
        raise corrupt(EOFError("archive ends without an end-of-archive marker"), None)
    if block.count(0) != len(block):
        raise corrupt(tarfile.ReadError(f"invalid header at offset {tf.offset}"), None)
    if key is not None:
        count += 1
        yield Sample(key, members, shard)
    if count == 0:
        raise fail("no samples")


def _drain(raw: IO[bytes]) -> None:
    while raw.read(1 << 16):
        pass


def _iter_pipe(url: str) -> Iterator[Sample]:
    """Stream a tar from a shell command, as WebDataset's ``pipe:`` URLs do.

    A failing command usually produces an empty or truncated stream; its exit status and last
    stderr line are the useful diagnosis, so they take precedence over the tar error.
    """
    cmd = url[len("pipe:") :]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
        assert proc.stdout is not None
        finished = False
        try:
            try:
                yield from _iter_tar(url, proc.stdout)
                _drain(proc.stdout)  # let the command finish writing (tar record padding)
                finished = True
            except ShardError as exc:
                proc.stdout.close()
                try:
                    rc = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                if rc not in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):
                    raise _command_failed(url, rc, err) from None
                raise exc from None
            except OSError as exc:
                raise ShardError(url, f"reading the command's output failed ({exc})") from None
        finally:
            if not finished and proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise _command_failed(url, rc, err)


def _command_failed(url: str, rc: int, err: IO[bytes]) -> ShardError:
    tail = _stderr_tail(err)
    return ShardError(url, f"command exited with status {rc}" + (f": {tail}" if tail else ""))


def iter_samples(url: str) -> Iterator[Sample]:
    """Stream the samples of one shard (a local tar, .tar.gz, .tgz or a ``pipe:`` URL).

    Consecutive members with the same key form one sample (the WebDataset convention). Everything
    malformed or unsafe raises :class:`ShardError`; see the module docstring for why we are strict.
    Nothing is extracted to disk and local files are opened read-only.
    """
    if url.startswith("pipe:"):
        yield from _iter_pipe(url)
        return
    try:
        f = open(url, "rb")  # noqa: SIM115 - closed in the finally below, across yields
    except OSError as exc:
        raise ShardError(url, f"cannot open ({exc.strerror or exc})") from None
    try:
        yield from _iter_tar(url, f)
    finally:
        f.close()


# --------------------------------------------------------------------------------------------
# Images and labels


def decode_image(data: bytes, *, shard: str, key: str, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode image bytes to uint8 ``[H, W, C]`` with C = 1 (mode L) or 3 (mode RGB).

    The declared size is checked before any pixel is decoded, so a tiny file claiming enormous
    dimensions costs nothing. Only L and RGB are accepted: silently converting other modes would
    make the marked image differ from the source in ways the user did not ask for.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(_PIL_FORMATS))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ShardError(shard, f"image has an empty size {width}x{height}", key)
            if width * height > max_pixels:
                raise ShardError(
                    shard,
                    f"image too large ({width}x{height} pixels; at most {max_pixels} allowed)",
                    key,
                )
            _check_mode(img.mode, shard, key)
            img.load()
            _check_mode(img.mode, shard, key)
            if img.size != (width, height):
                raise ShardError(shard, "image does not decode (size changed while loading)", key)
            arr = np.array(img, dtype=np.uint8)
    except ShardError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ShardError(shard, f"image too large ({_one_line(str(exc), 120)})", key) from None
    except MemoryError:
        raise ShardError(shard, "image too large (out of memory while decoding)", key) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error,
            EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:  # fmt: skip
        detail = _one_line(str(exc), 120) or type(exc).__name__
        raise ShardError(shard, f"image does not decode ({detail})", key) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def _check_mode(mode: str, shard: str, key: str) -> None:
    if mode not in ("L", "RGB"):
        raise ShardError(
            shard, f"unsupported image mode {mode!r}; convert the images to RGB or L (8-bit)", key
        )


def encode_png(image: np.ndarray) -> bytes:
    """Encode uint8 ``[H, W, 1]`` (or ``[H, W]``) as an L PNG and ``[H, W, 3]`` as an RGB PNG.

    Settings are pinned and no metadata is written, so equal pixels always give equal bytes and
    shard hashes stay reproducible.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_png needs shape [H, W, 1] or [H, W, 3], got {image.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"encode_png needs a non-empty image, got {image.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


_LABEL_RE = re.compile(r"[+-]?[0-9]{1,18}")


def parse_label(
    sample: Sample, *, shard: str, field: str = "cls", num_classes: int | None = None
) -> int:
    """The sample's class label, from ASCII integer text in member ``field``.

    Labels decide which class direction an image is marked towards, so anything doubtful is an
    error rather than a guess.
    """
    data = sample.get(field)
    if data is None:
        raise ShardError(shard, f"no label member {field!r}", sample.key)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not _LABEL_RE.fullmatch(text):
        shown = _one_line(data[:40].decode("utf-8", "replace"), 40)
        raise ShardError(shard, f"label {field!r} is not an integer ({shown!r})", sample.key)
    label = int(text)
    if label < 0:
        raise ShardError(shard, f"label {label} is negative", sample.key)
    if num_classes is not None and label >= num_classes:
        raise ShardError(
            shard,
            f"label {label} is out of range for {num_classes} classes (0..{num_classes - 1})",
            sample.key,
        )
    return label


# --------------------------------------------------------------------------------------------
# Writing


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


def _check_sample_for_write(sample: Sample) -> None:
    """Refuse samples that would not read back as the same key/extension pairs."""
    key = sample.key
    problem = _unsafe_name(key)
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
    for names ustar cannot hold), so the same samples always give the same bytes. The data goes to
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
        tf = tarfile.TarFile(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8")
        for sample in samples:
            _check_sample_for_write(sample)
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r}")
            seen.add(sample.key)
            for ext, data in sample.members:
                info = _tarinfo(f"{sample.key}.{ext}", len(data))
                try:
                    info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
                    tf.format = tarfile.USTAR_FORMAT
                except ValueError:
                    tf.format = tarfile.GNU_FORMAT  # name too long for ustar
                tf.addfile(info, io.BytesIO(data))
            count += 1
        tf.format = tarfile.USTAR_FORMAT
        tf.close()
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
) -> list[Path]:
    """Write arrays as WebDataset shards ``{prefix}-{j:06d}.tar`` (PNG image + ASCII label).

    This is how tests and benchmarks make datasets, so it goes through :func:`write_shard` and is
    reproducible too. ``extra(i)`` adds members to sample ``i``.
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
            outdir / f"{prefix}-{j:06d}.tar", (make(i) for i in range(start, stop))
        )
        paths.append(result.path)
    return paths
