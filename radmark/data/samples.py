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

#: File name endings we recognise as shards (directories are scanned for these).
SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")


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
