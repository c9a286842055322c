"""Samples as WebDataset defines them: the members of a tar that share a key.

Members stay raw bytes so that a sample can be copied to an output shard untouched except for the
members radmark deliberately replaces. Names are checked here once: a member that could escape a
directory is refused wherever it is read or written."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from radmark.errors import ShardError

IMAGE_EXTS: tuple[str, ...] = (
    "png", "jpg", "jpeg", "ppm", "pgm", "pbm", "pnm", "bmp", "webp", "tif", "tiff",
)  # fmt: skip

#: Compression of a shard, by the ending of its name: output shards keep their input's name and
#: so its compression (``data/writer.py``). Reading sniffs the bytes instead (``tarstream.py``).
COMPRESSION_BY_SUFFIX: dict[str, str | None] = {
    ".tar": None,
    ".tar.gz": "gz", ".tgz": "gz",
    ".tar.xz": "xz", ".txz": "xz",
    ".tar.bz2": "bz2", ".tbz2": "bz2", ".tbz": "bz2",
}  # fmt: skip

#: File name endings we recognise as shards (directories are scanned for these).
SHARD_SUFFIXES: tuple[str, ...] = tuple(COMPRESSION_BY_SUFFIX)


def compression_of(name: str) -> str | None:
    """``"gz"``, ``"xz"``, ``"bz2"`` or None (a plain tar, or a name we do not recognise)."""
    for suffix, comp in COMPRESSION_BY_SUFFIX.items():
        if name.endswith(suffix):
            return comp
    return None


def name_bytes(text: str) -> bytes:
    """The bytes a member or file name had on disk or in the tar.

    Names are decoded as UTF-8 with ``surrogateescape`` (tarfile's and the OS's default), so a
    name that is not valid UTF-8 still round-trips; every hash or seed of a name goes through
    here, which for valid UTF-8 is the plain UTF-8 encoding (issue #12: such names were a crash).
    """
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` with any undecodable bytes shown as ``\\xNN``: for messages and signed JSON."""
    return name_bytes(text).decode("utf-8", "backslashreplace")


def _env_bytes(name: str, default: int) -> int:
    """A positive integer number of bytes from the environment, else ``default``."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


#: A single member larger than this is refused (issue #12): members are read into memory, and a
#: marking window holds a batch's samples, so this bounds memory per sample; no image radmark can
#: mark comes near it (a 2048² RGB PNG is at most 12 MiB). ``RADMARK_MAX_MEMBER_BYTES`` (bytes,
#: read at import) raises it for datasets with large non-image members.
MAX_MEMBER_BYTES: int = _env_bytes("RADMARK_MAX_MEMBER_BYTES", 64 << 20)


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


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be trusted, or None if it is fine."""
    if not name:
        return "member with an empty name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"member {name!r} has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return f"member {name!r} contains a '..' path component"
    return None


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
