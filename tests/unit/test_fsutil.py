"""``radmark/fsutil.py``: atomic writes that never replace a file silently (issue #12), and reads
that refuse anything but a regular file without blocking on it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from radmark.errors import InputError
from radmark.fsutil import (
    TargetExistsError,
    atomic_write_bytes,
    check_new_target,
    place_file,
    read_regular_file,
)


def test_atomic_write_refuses_an_existing_file_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "owner.key"
    target.write_bytes(b"the only copy of a secret")
    target.chmod(0o600)
    with pytest.raises(TargetExistsError, match="--force"):
        atomic_write_bytes(target, b"public record", overwrite=False)
    assert target.read_bytes() == b"the only copy of a secret"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["owner.key"]  # no temp file left
    atomic_write_bytes(target, b"public record", 0o644, overwrite=True)
    assert target.read_bytes() == b"public record"
    atomic_write_bytes(tmp_path / "new", b"x", overwrite=False)
    assert (tmp_path / "new").read_bytes() == b"x"


def test_place_file_does_not_replace_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    tmp, target = tmp_path / ".t.tmp", tmp_path / "t"
    tmp.write_bytes(b"new")
    target.write_bytes(b"appeared after the check")
    with pytest.raises(TargetExistsError):
        place_file(tmp, target, overwrite=False)
    assert target.read_bytes() == b"appeared after the check"


def test_check_new_target(tmp_path: Path) -> None:
    existing = tmp_path / "plot.png"
    existing.write_bytes(b"png")
    with pytest.raises(TargetExistsError, match=r"--plot .*plot.png already exists.*--force"):
        check_new_target(existing, force=False, what="--plot")
    check_new_target(existing, force=True)
    check_new_target(tmp_path / "fresh.png", force=False)
    with pytest.raises(InputError, match="is a directory"):
        check_new_target(tmp_path, force=True)
    with pytest.raises(InputError, match="does not exist"):
        check_new_target(tmp_path / "no" / "dir" / "p.png", force=True)
    link = tmp_path / "link.png"
    link.symlink_to(existing)
    with pytest.raises(InputError, match="not a regular file"):
        check_new_target(link, force=True)


def test_read_regular_file_refuses_directories_links_and_fifos(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    assert read_regular_file(tmp_path / "f") == b"data"
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        read_regular_file(tmp_path / "d")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    with pytest.raises(InputError, match="symbolic links"):
        read_regular_file(tmp_path / "l")
    with pytest.raises(InputError, match="too large"):
        read_regular_file(tmp_path / "f", max_bytes=3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(_raises(read_regular_file, fifo)))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert isinstance(result[0], InputError) and "not a regular file" in str(result[0])


def _raises(fn, *args) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("no exception")


def test_check_new_target_never_writes_over_an_input_or_a_secret(tmp_path: Path) -> None:
    """Issue #12 §6: --force replaces a file the user names, but never one of the command's
    inputs (by inode, whatever the spelling) nor a secret key (unless a new key replaces it)."""
    from radmark.fsutil import holds_a_secret

    shard = tmp_path / "in" / "data-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"tar bytes")
    spelled = tmp_path / "in" / ".." / "in" / "data-000000.tar"
    linked = tmp_path / "hardlink.tar"
    os.link(shard, linked)
    for target in (shard, spelled, linked):
        with pytest.raises(InputError, match="one of this command's inputs"):
            check_new_target(target, force=True, what="--out", inputs=[str(shard)])
    check_new_target(tmp_path / "other.tar", force=True, inputs=[str(shard)])  # a new file: fine
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    check_new_target(other, force=True, inputs=[str(shard)])  # an existing non-input: --force ok

    key = tmp_path / "owner.key"
    key.write_bytes(b'{"format_version":1,"secret":{},"type":"radmark.keyfile"}')
    secret = tmp_path / "x.secret"
    secret.write_bytes(b'{"encryption":"none","type":"radmark.secret"}')
    for target in (key, secret):
        assert holds_a_secret(target)
        with pytest.raises(InputError, match="holds a radmark secret key"):
            check_new_target(target, force=True, what="--out")
        check_new_target(target, force=True, may_replace_secret=True)  # keygen --out --force
    assert not holds_a_secret(other) and not holds_a_secret(tmp_path / "missing")
