"""Tests for radmark.data (sources, tar streams, samples, images, writer): reading, refusals, images, labels and writing."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from radmark.data.images import decode_image, encode_png, parse_label
from radmark.data.samples import IMAGE_EXTS, Sample
from radmark.data.sources import expand_shards, iter_samples, shard_name
from radmark.data.writer import ShardWriteResult, sha256_file, write_dataset, write_shard
from radmark.errors import InputError, ShardError

# ---------------------------------------------------------------------------------------------
# helpers


def _images(n: int, h: int = 8, w: int = 8, c: int | None = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _png(mode: str, size: tuple[int, int] = (4, 3)) -> bytes:
    """An image file in `mode` (PNG, or TIFF for modes PNG cannot hold)."""
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="TIFF" if mode in ("I", "F") else "PNG")
    return buf.getvalue()


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _make_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def _tar_of(path: Path, names: list[str]) -> str:
    return _make_tar(path, [_reg(n, b"x" + n.encode()) for n in names])


def _refused(url: str) -> ShardError:
    with pytest.raises(ShardError) as info:
        list(iter_samples(url))
    err = info.value
    assert err.shard == url
    assert url in str(err)
    assert "\n" not in err.diagnostics()
    return err


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_write_dataset_round_trip(tmp_path: Path, channels: int | None) -> None:
    images = _images(5, c=channels)
    labels = [3, 0, 9, 1, 7]
    paths = write_dataset(
        images,
        labels,
        tmp_path / "out",
        prefix="ds",
        samples_per_shard=2,
        extra=lambda i: {"json": f'{{"i": {i}}}'.encode()},
    )
    assert [p.name for p in paths] == ["ds-000000.tar", "ds-000001.tar", "ds-000002.tar"]
    urls = expand_shards([str(tmp_path / "out")])
    assert urls == [str(p) for p in paths]

    got = [s for url in urls for s in iter_samples(url)]
    assert [s.key for s in got] == [f"{i:08d}" for i in range(5)]
    expected = images if channels is not None else images[..., None]
    for i, sample in enumerate(got):
        assert [e for e, _ in sample.members] == ["png", "cls", "json"]
        assert sample.image_ext() == "png"
        assert sample.get("json") == f'{{"i": {i}}}'.encode()
        assert sample.get("nope") is None
        assert parse_label(sample, shard=urls[0], num_classes=10) == labels[i]
        pixels = decode_image(sample.get("png") or b"", shard="s", key=sample.key)
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, expected[i])


def test_write_dataset_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_dataset(_images(2), [0], tmp_path)
    with pytest.raises(ValueError):
        write_dataset(_images(2).astype(np.float32), [0, 1], tmp_path)
    with pytest.raises(ValueError):
        write_dataset(_images(2, c=4), [0, 1], tmp_path)
    with pytest.raises(ValueError):
        write_dataset(_images(1), [0], tmp_path, extra=lambda i: {"cls": b"1"})


def test_webdataset_tarwriter_compatibility(tmp_path: Path) -> None:
    import webdataset as wds

    path = tmp_path / "wds.tar"
    pngs = [encode_png(img) for img in _images(3)]
    with wds.TarWriter(str(path)) as sink:
        for i, data in enumerate(pngs):
            sink.write({"__key__": f"dir/sample{i:03d}", "png": data, "cls": str(i).encode()})
    got = list(iter_samples(str(path)))
    assert [s.key for s in got] == [f"dir/sample{i:03d}" for i in range(3)]
    for i, sample in enumerate(got):
        assert sample.get("png") == pngs[i]
        assert parse_label(sample, shard=str(path)) == i


def test_key_split_uses_first_dot_of_basename(tmp_path: Path) -> None:
    url = _tar_of(tmp_path / "k.tar", ["a.b/000.seg.png", "a.b/000.png", "a.b/001.png"])
    got = list(iter_samples(url))
    assert [s.key for s in got] == ["a.b/000", "a.b/001"]
    assert [e for e, _ in got[0].members] == ["seg.png", "png"]
    assert got[0].image_ext() == "png"  # "seg.png" is not an image extension


def test_directories_are_skipped_and_gzip_is_read(tmp_path: Path) -> None:
    d = tarfile.TarInfo("sub")
    d.type = tarfile.DIRTYPE
    plain = _make_tar(tmp_path / "p.tar", [(d, None), _reg("sub/0.txt", b"hi")])
    gz = tmp_path / "p.tar.gz"
    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    for url in (plain, str(gz)):
        got = list(iter_samples(url))
        assert [(s.key, s.members) for s in got] == [("sub/0", [("txt", b"hi")])]


def test_several_image_members_are_ambiguous() -> None:
    sample = Sample("k", [("png", b"a"), ("JPG", b"b")], shard="s.tar")
    with pytest.raises(ShardError, match="several image members"):
        sample.image_ext()
    assert Sample("k", [("cls", b"1")]).image_ext() is None
    assert "tiff" in IMAGE_EXTS


# ---------------------------------------------------------------------------------------------
# writing


def test_write_shard_is_reproducible(tmp_path: Path) -> None:
    samples = [
        Sample("000", [("png", encode_png(_images(1)[0])), ("cls", b"4")]),
        Sample("sub/001", [("jpg", b"\xff\xd8junk"), ("txt", "é".encode())]),
    ]
    a = write_shard(tmp_path / "a.tar", iter(samples))
    time.sleep(0.01)
    b = write_shard(tmp_path / "b.tar", samples)
    assert isinstance(a, ShardWriteResult)
    assert a.path == tmp_path / "a.tar"
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256 == sha256_file(tmp_path / "a.tar")
    assert a.samples == 2
    assert a.bytes == (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["000.png", "000.cls", "sub/001.jpg", "sub/001.txt"]
    for m in members:
        assert (m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) == (0o644, 0, 0, "", "", 0)
        assert m.isreg()
    assert [(s.key, s.members) for s in iter_samples(str(tmp_path / "a.tar"))] == [
        (s.key, s.members) for s in samples
    ]


def test_write_shard_long_names_fall_back_to_gnu(tmp_path: Path) -> None:
    key = "k" * 150  # no '/', so ustar cannot split it
    res = write_shard(tmp_path / "long.tar", [Sample(key, [("png", b"p")])])
    assert [s.key for s in iter_samples(str(res.path))] == [key]
    again = write_shard(tmp_path / "long2.tar", [Sample(key, [("png", b"p")])])
    assert again.sha256 == res.sha256


def test_write_shard_refuses_keys_that_would_not_read_back(tmp_path: Path) -> None:
    for bad in [Sample("a.b", [("png", b"")]), Sample("../x", [("png", b"")])]:
        with pytest.raises(ValueError):
            write_shard(tmp_path / "bad.tar", [bad])
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.tar", [Sample("a", [("png", b"")])] * 2)
    assert os.listdir(tmp_path) == []


def test_write_shard_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out.tar"

    def boom() -> Iterator[Sample]:
        yield Sample("000", [("cls", b"1" * 100_000)])
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_shard(target, boom())
    assert os.listdir(tmp_path) == []

    # An existing shard is left exactly as it was.
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        write_shard(target, boom())
    assert os.listdir(tmp_path) == ["out.tar"]
    assert target.read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------
# shard lists


def test_expand_shards(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "nested").mkdir(parents=True)
    for name in ["b.tar", "a.tgz", "c.tar.gz", "notes.txt", "nested/z.tar"]:
        (d / name).write_bytes(b"")
    f = tmp_path / "one.tar"
    f.write_bytes(b"")
    listed = [str(d / n) for n in ["a.tgz", "b.tar", "c.tar.gz"]]
    assert expand_shards([str(d)]) == listed
    # De-duplicated, first occurrence wins, order preserved.
    assert expand_shards([str(f), str(f), str(d / "b.tar"), str(d)]) == [
        str(f),
        listed[1],
        listed[0],
        listed[2],
    ]
    for i in range(3):
        (tmp_path / f"data-{i:06d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "data-{000000..000002}.tar")
    assert expand_shards([pattern]) == [str(tmp_path / f"data-{i:06d}.tar") for i in range(3)]
    assert expand_shards(["pipe:cat x.tar", str(f)]) == ["pipe:cat x.tar", str(f)]

    with pytest.raises(InputError, match="data-000003.tar"):
        expand_shards([str(tmp_path / "data-{000000..000003}.tar")])
    with pytest.raises(InputError, match="missing.tar"):
        expand_shards([str(tmp_path / "missing.tar")])
    with pytest.raises(InputError):
        expand_shards([])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no shards"):
        expand_shards([str(empty)])


def test_shard_name() -> None:
    assert shard_name("/x/y/data-000001.tar") == "data-000001.tar"
    assert shard_name("rel.tar.gz") == "rel.tar.gz"
    assert shard_name("pipe:curl -s https://h/p/data-000002.tgz") == "data-000002.tgz"
    with pytest.raises(InputError):
        shard_name("pipe:curl -s https://h/p/data")
    with pytest.raises(InputError):
        shard_name("pipe:")


def test_pipe_urls(tmp_path: Path) -> None:
    (path,) = write_dataset(_images(3), [0, 1, 2], tmp_path)
    direct = [(s.key, s.members) for s in iter_samples(str(path))]
    assert [(s.key, s.members) for s in iter_samples(f"pipe:cat {path}")] == direct
    # Stopping early must not hang or leak the command.
    it = iter_samples(f"pipe:cat {path}")
    assert next(it).key == "00000000"
    it.close()

    err = _refused(f"pipe:cat {tmp_path / 'absent.tar'}")
    assert "status" in err.reason
    err = _refused(f"pipe:cat {path}; exit 3")
    assert "status 3" in err.reason


# ---------------------------------------------------------------------------------------------
# refusals


def _valid_shard(tmp_path: Path) -> tuple[Path, list[tarfile.TarInfo]]:
    (path,) = write_dataset(_images(4, h=24, w=24), [0, 1, 2, 3], tmp_path / "v")
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    return path, members


def test_truncated_tar_is_refused(tmp_path: Path) -> None:
    path, members = _valid_shard(tmp_path)
    data = path.read_bytes()
    content_end = members[-1].offset_data + members[-1].size
    cuts = {
        "half": content_end // 2,
        "mid-data": members[2].offset_data + members[2].size // 2,
        "at-header": members[3].offset,  # cut exactly at a header boundary
        "mid-header": members[3].offset + 100,
        "before-end": content_end + (-content_end % 512),  # all data but no end marker
    }
    for label, cut in cuts.items():
        bad = tmp_path / f"cut-{label}.tar"
        bad.write_bytes(data[:cut])
        err = _refused(str(bad))
        assert "truncated or corrupt" in err.reason or "truncated" in err.reason, label

    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    assert "truncated or corrupt" in _refused(str(gz)).reason


def test_corrupt_tar_is_refused(tmp_path: Path) -> None:
    rng = random.Random(0)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(rng.randbytes(4096))
    assert "corrupt" in _refused(str(junk)).reason
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    _refused(str(empty))

    # Garbage in place of a later header: tarfile alone would silently stop there.
    path, members = _valid_shard(tmp_path)
    data = bytearray(path.read_bytes())
    off = members[2].offset
    data[off : off + 512] = rng.randbytes(512)
    bad = tmp_path / "garbled.tar"
    bad.write_bytes(bytes(data))
    assert "corrupt" in _refused(str(bad)).reason


@pytest.mark.parametrize(
    ("entries", "needle", "sample"),
    [
        ([_reg("../x.png", b"p")], "'..'", None),
        ([_reg("a/../../x.png", b"p")], "'..'", None),
        ([_reg("/etc/x.png", b"p")], "absolute", None),
        ([_special("000.png", tarfile.SYMTYPE, "/etc/passwd")], "symlink", "000"),
        (
            [_reg("000.cls", b"1"), _special("000.png", tarfile.LNKTYPE, "000.cls")],
            "hard link",
            "000",
        ),
        ([_special("000.png", tarfile.CHRTYPE)], "device", "000"),
        ([_special("000.png", tarfile.FIFOTYPE)], "fifo", "000"),
        ([_reg("000", b"p")], "no extension", None),
        ([_reg("000.png", b"p"), _reg("000.png", b"q")], "twice", "000"),
        (
            [_reg("000.png", b"p"), _reg("001.png", b"p"), _reg("000.cls", b"1")],
            "duplicate key",
            "000",
        ),
        ([_special("emptydir", tarfile.DIRTYPE)], "no samples", None),
        ([], "no samples", None),
    ],
)
def test_malformed_members_are_refused(
    tmp_path: Path,
    entries: list[tuple[tarfile.TarInfo, bytes | None]],
    needle: str,
    sample: str | None,
) -> None:
    url = _make_tar(tmp_path / "bad.tar", entries)
    err = _refused(url)
    assert needle in err.reason
    assert err.sample == sample


def test_missing_file_is_refused(tmp_path: Path) -> None:
    _refused(str(tmp_path / "nope.tar"))


# ---------------------------------------------------------------------------------------------
# labels


def test_parse_label() -> None:
    ok = Sample("k", [("cls", b" 7\n"), ("label", b"2")])
    assert parse_label(ok, shard="s.tar") == 7
    assert parse_label(ok, shard="s.tar", field="label", num_classes=3) == 2
    cases = [
        (Sample("k", [("png", b"")]), None, "no label"),
        (Sample("k", [("cls", b"cat")]), None, "not an integer"),
        (Sample("k", [("cls", b"1.5")]), None, "not an integer"),
        (Sample("k", [("cls", b"\xff")]), None, "not an integer"),
        (Sample("k", [("cls", b"-1")]), None, "negative"),
        (Sample("k", [("cls", b"10")]), 10, "out of range"),
    ]
    for sample, num_classes, needle in cases:
        with pytest.raises(ShardError) as info:
            parse_label(sample, shard="s.tar", num_classes=num_classes)
        assert needle in info.value.reason
        assert (info.value.shard, info.value.sample) == ("s.tar", "k")


# ---------------------------------------------------------------------------------------------
# images


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decode_refuses_huge_declared_size_fast() -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    start = time.perf_counter()
    with pytest.raises(ShardError, match="image too large") as info:
        decode_image(data, shard="s.tar", key="k")
    assert time.perf_counter() - start < 1.0
    assert (info.value.shard, info.value.sample) == ("s.tar", "k")
    # Our own limit applies below PIL's.
    with pytest.raises(ShardError, match="image too large"):
        decode_image(_png("RGB", (20, 20)), shard="s", key="k", max_pixels=399)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "1", "LA", "I", "F"])
def test_decode_refuses_unsupported_modes(mode: str) -> None:
    with pytest.raises(ShardError, match="unsupported image mode") as info:
        decode_image(_png(mode), shard="s.tar", key="k")
    assert "RGB or L" in info.value.reason


def test_decode_refuses_cmyk_jpeg() -> None:
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(ShardError, match="unsupported image mode 'CMYK'"):
        decode_image(buf.getvalue(), shard="s.tar", key="k")


def test_decode_refuses_garbage() -> None:
    good = _png("RGB", (16, 16))
    for data in [b"", b"not an image", good[: len(good) // 2], b"%!PS-Adobe-3.0 EPSF-3.0\n"]:
        with pytest.raises(ShardError, match="image does not decode"):
            decode_image(data, shard="s.tar", key="k")


def test_decode_accepts_l_and_rgb() -> None:
    gray = decode_image(_png("L", (5, 3)), shard="s", key="k")
    assert gray.shape == (3, 5, 1) and gray.dtype == np.uint8
    rgb = decode_image(_png("RGB", (5, 3)), shard="s", key="k")
    assert rgb.shape == (3, 5, 3)
    buf = io.BytesIO()
    Image.new("RGB", (6, 2), (200, 10, 30)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), shard="s", key="k").shape == (2, 6, 3)


def test_encode_png_round_trips_and_is_deterministic() -> None:
    for img in [_images(1, h=7, w=5, c=3)[0], _images(1, h=7, w=5, c=1)[0]]:
        data = encode_png(img)
        assert data == encode_png(img.copy())
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == ("RGB" if img.shape[2] == 3 else "L")
            assert im.info == {}  # no metadata that could vary between runs
        np.testing.assert_array_equal(decode_image(data, shard="s", key="k"), img)
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2, 4), dtype=np.uint8))


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    c=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_decode_property(h: int, w: int, c: int, seed: int) -> None:
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(img), shard="s", key="k"), img)


# ---------------------------------------------------------------------------------------------
# issue #12: compressed shards keep their compression; names that are not UTF-8; pipe: commands


MAGIC = {".tar": b"", ".tar.gz": b"\x1f\x8b", ".tgz": b"\x1f\x8b", ".tar.xz": b"\xfd7zXZ\x00",
         ".txz": b"\xfd7zXZ\x00", ".tar.bz2": b"BZh", ".tbz2": b"BZh", ".tbz": b"BZh"}  # fmt: skip


@pytest.mark.parametrize("suffix", sorted(MAGIC))
def test_compressed_shards_are_scanned_written_and_read_back(tmp_path: Path, suffix: str) -> None:
    images, labels = _images(5, h=9, w=9), [0, 1, 2, 3, 4]
    (path,) = write_dataset(images, labels, tmp_path / "a", suffix=suffix)
    (again,) = write_dataset(images, labels, tmp_path / "b", suffix=suffix)
    data = path.read_bytes()
    assert path.name.endswith(suffix) and data.startswith(MAGIC[suffix])
    assert data == again.read_bytes()  # fixed level, mtime 0, no file name: reproducible
    assert expand_shards([str(tmp_path / "a")]) == [str(path)]  # found by the directory scan
    got = list(iter_samples(str(path)))
    assert [s.key for s in got] == [f"{i:08d}" for i in range(5)]
    # written back under the same name: the same compression
    (tmp_path / "c").mkdir()
    res = write_shard(tmp_path / "c" / path.name, got)
    assert res.path.read_bytes().startswith(MAGIC[suffix]) and res.sha256 == sha256_file(res.path)
    assert [(s.key, s.members) for s in iter_samples(str(res.path))] == [
        (s.key, s.members) for s in got
    ]
    if suffix == ".tar.gz":  # no name, no time in the gzip header
        assert data[3] == 0 and data[4:8] == b"\0\0\0\0"


def test_names_that_are_not_utf8_keep_their_bytes(tmp_path: Path) -> None:
    """Member names are decoded with surrogate escapes and written back as the same bytes."""
    raw = tmp_path / "raw.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in (b"caf\xe9.png", b"caf\xe9.cls", b"\xff\xfe/x.png", b"\xff\xfe/x.cls"):
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = 1
            tf.addfile(info, io.BytesIO(b"1"))
    raw.write_bytes(buf.getvalue())
    samples = list(iter_samples(str(raw)))
    assert [s.key for s in samples] == ["caf\udce9", "\udcff\udcfe/x"]
    out = write_shard(tmp_path / "out.tar", samples)
    with tarfile.open(out.path, encoding="utf-8", errors="surrogateescape") as tf:
        names = [os.fsencode(m.name) for m in tf.getmembers()]
    assert names == [b"caf\xe9.png", b"caf\xe9.cls", b"\xff\xfe/x.png", b"\xff\xfe/x.cls"]
    from radmark.data.samples import name_bytes, printable

    assert name_bytes("caf\udce9") == b"caf\xe9" and printable("caf\udce9") == "caf\\xe9"
    assert name_bytes("café") == "café".encode()  # valid UTF-8: the plain encoding


def test_pipe_commands_do_not_see_the_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = write_dataset(_images(2), [0, 1], tmp_path)
    monkeypatch.setenv("RADMARK_PASSPHRASE", "hunter2")
    monkeypatch.setenv("SOME_OTHER_VARIABLE", "kept")
    url = 'pipe:test -z "${RADMARK_PASSPHRASE+set}" && test -n "$SOME_OTHER_VARIABLE" && cat '
    assert len(list(iter_samples(url + str(path)))) == 2
    leak = 'pipe:test -n "${RADMARK_PASSPHRASE+set}" && cat ' + str(path)  # the control
    with pytest.raises(ShardError, match="status 1"):
        list(iter_samples(leak))


def test_pipe_input_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radmark.data.sources import pipe_input_paths

    (path,) = write_dataset(_images(1), [0], tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    assert pipe_input_paths(f"pipe:cat {path}") == [str(path)]
    assert pipe_input_paths("pipe:cat in/data-000000.tar") == ["in/data-000000.tar"]
    assert pipe_input_paths(f"pipe:cat <{path}") == [str(path)]
    assert pipe_input_paths(f"pipe:cat < '{path}'") == [str(path)]
    assert pipe_input_paths(f"pipe:zcat -f file://{path} | tar -t") == [str(path)]
    assert pipe_input_paths("pipe:curl -s https://example.org/data-000000.tar") == []
    assert pipe_input_paths("pipe:cat 'unbalanced") == []


def test_pipe_shard_name_is_the_last_word_naming_a_shard() -> None:
    assert shard_name("pipe:curl -fsSL https://host/x/data-000001.tar") == "data-000001.tar"
    assert shard_name("pipe:aws s3 cp s3://bucket/p/data-000002.tar -") == "data-000002.tar"
    assert shard_name("pipe:cat a.tar.gz") == "a.tar.gz"
    with pytest.raises(InputError, match="cannot tell the shard name"):
        shard_name("pipe:cat -")
