"""Fuzzing the two parsers that read untrusted bytes: shards and model files.

Thousands of mutated inputs (byte flips, truncations, insertions); each must either parse or fail
with a RadmarkError (one clear line, exit 2 in the CLI) — never another exception.
The case counts are asserted so docs/security.md can quote them.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import pytest

from radmark.data.images import decode_image
from radmark.data.sources import iter_samples
from radmark.data.writer import write_dataset
from radmark.errors import RadmarkError

SHARD_CASES = 3000
MODEL_CASES = 400


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # insert junk
        pos = rng.randrange(len(b))
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # overwrite a header-sized block (tar headers are 512 bytes)
        pos = rng.randrange(0, len(b), 512)
        b[pos : pos + 512] = bytes(rng.randrange(256) for _ in range(512))
    return bytes(b)


@pytest.fixture(scope="module")
def seed_shard(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    out = tmp_path_factory.mktemp("seed")
    (path,) = write_dataset(
        images, [0, 1, 2, 3], out, samples_per_shard=10, extra=lambda i: {"json": b'{"i": %d}' % i}
    )
    return Path(path).read_bytes()


def test_fuzz_shards(seed_shard: bytes, tmp_path: Path) -> None:
    rng = random.Random(1234)
    target = tmp_path / "fuzz.tar"
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(SHARD_CASES):
        target.write_bytes(_mutate(seed_shard, rng))
        try:
            for sample in iter_samples(str(target)):
                ext = sample.image_ext()
                if ext is not None:
                    decode_image(sample.get(ext) or b"", shard=str(target), key=sample.key)
            outcomes["parsed"] += 1
        except RadmarkError as exc:
            assert "\n" not in exc.diagnostics()
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == SHARD_CASES
    assert outcomes["refused"] > SHARD_CASES // 4  # the mutations really hit the parser


def test_fuzz_images() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, format="PNG")
    png = buf.getvalue()
    rng = random.Random(99)
    for _ in range(SHARD_CASES):
        with contextlib.suppress(RadmarkError):
            decode_image(_mutate(png, rng), shard="s", key="k")


def test_fuzz_model_files(tmp_path: Path) -> None:
    import torch

    from radmark.models import build_model, load_model, save_model

    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_model(
        build_model("smallcnn", 3, in_chans=1),
        good,
        arch="smallcnn",
        num_classes=3,
        mean=(0.5,),
        std=(0.25,),
    )
    data = good.read_bytes()
    rng = random.Random(7)
    target = tmp_path / "fuzz.safetensors"
    refused = 0
    for _ in range(MODEL_CASES):
        b = bytearray(data)
        if rng.random() < 0.5:  # aim at the header, where the parser lives
            end = 8 + int.from_bytes(data[:8], "little")
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(end, len(b)))] = rng.randrange(256)
        else:
            b = bytearray(_mutate(data, rng))
        target.write_bytes(bytes(b))
        try:
            load_model(str(target))
        except RadmarkError:
            refused += 1
    assert refused > MODEL_CASES // 4
