"""radmark's shards are WebDataset shards: the ``webdataset`` package reads what radmark writes.

radmark does not depend on webdataset (docs/scale.md says why it reads and writes shards
itself); the reverse direction, webdataset's ``TarWriter`` read by radmark, is in
``test_shards.py``. webdataset is a dev dependency, for these checks only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_shards

wds = pytest.importorskip("webdataset")


def test_webdataset_reads_radmark_shards_byte_for_byte(tmp_path: Path) -> None:
    from radmark.data.sources import iter_samples

    shards = make_shards(tmp_path, n=12, per_shard=6)
    ours = [s for shard in shards for s in iter_samples(str(shard))]
    theirs = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert [t["__key__"] for t in theirs] == [s.key for s in ours]
    for t, s in zip(theirs, ours, strict=True):
        members = dict(s.members)
        assert {k for k in t if not k.startswith("__")} == set(members)
        for ext, data in members.items():
            assert t[ext] == data  # no decoding: the raw bytes radmark wrote
