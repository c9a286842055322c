"""Reading one tar stream into samples, treating it as hostile.

Members that could escape a directory, links, devices, truncated streams and oversized members are
refused with a one-line :class:`~radmark.errors.ShardError` naming the shard and the sample, never
a traceback. Nothing is extracted to disk. We decompress ourselves (gzip, bzip2, xz, sniffed by
magic) so that the stream tarfile reads is the tar itself and can be checked to end at a zero
block: tarfile quietly treats a truncated header as the end of the archive."""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from radmark.data.samples import MAX_MEMBER_BYTES, Sample, one_line, unsafe_name
from radmark.errors import ShardError

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


def iter_tar(shard: str, raw: IO[bytes]) -> Iterator[Sample]:
    """Group the members of one tar stream into samples, refusing anything unsafe or malformed."""
    last_key: str | None = None

    def fail(problem: str, key: str | None = None) -> ShardError:
        return ShardError(shard, problem, key)

    def corrupt(exc: BaseException, key: str | None) -> ShardError:
        detail = one_line(str(exc)) or type(exc).__name__
        where = f" after sample {last_key!r}" if key is None and last_key is not None else ""
        return fail(f"truncated or corrupt tar{where} ({detail})", key)

    try:
        tap = _Tap(_decompressed(raw))
        tf = tarfile.open(fileobj=tap, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
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
            problem = unsafe_name(name)
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
