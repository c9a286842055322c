"""Verify time on CPU (issue #4): a ResNet-18 suspect, 10k probe images, 1 key and 100 keys.

Features, the alignment and the pull-back directions are computed once per marker; each extra key
costs a carrier derivation and C cosines. The 100 keys each get a real signed mark record (made
with the library's record writer on an empty shard list), so `verify_model` runs exactly as the
CLI does. Writes bench/results/verify-time-<stamp>.json. Ratios matter; absolute CPU seconds depend
on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe-images", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("bench/work/verify-time"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    import torch

    from bench import fmnist
    from radmark.data.writer import write_dataset
    from radmark.models import build_model, save_model
    from radmark.verify.run import verify_model
    from tests.factories import make_record

    torch.manual_seed(0)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)  # keystores from an earlier run would add keys
    work.mkdir(parents=True)
    images, labels = fmnist.load("test", fmnist.ensure_installed())
    n = args.probe_images
    write_dataset(images[:n], labels[:n].tolist(), work / "probe", samples_per_shard=5000)
    for name, seed in (("marker", 0), ("suspect", 1)):
        torch.manual_seed(seed)
        m = build_model("resnet18", 10, small_stem=True, in_chans=1).eval()
        save_model(
            m,
            work / f"{name}.safetensors",
            arch="resnet18",
            num_classes=10,
            small_stem=True,
            mean=(0.286,),
            std=(0.353,),
        )
    timings = {}
    for k in (1, args.keys):
        ks = work / f"ks-{k}"
        for _ in range(k):
            make_record(ks, work / "marker.safetensors", num_classes=10)
        for pullback in (False, True) if k == 1 else (False,):
            t0 = time.perf_counter()
            res = verify_model(
                str(work / "suspect.safetensors"),
                keystore=ks,
                probe=[str(work / "probe")],
                pullback=pullback,
            )
            timings[f"{k}_keys_pullback_{pullback}"] = {
                "seconds": time.perf_counter() - t0,
                "results": len(res.results),
                "probe": res.probe_size,
            }
            print(k, pullback, timings[f"{k}_keys_pullback_{pullback}"], flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = {
        "kind": "verify-time",
        "device": f"cpu: {platform.machine()} / {os.cpu_count()} cpus",
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "suspect": "resnet18 (small stem)",
        "marker": "resnet18 (small stem)",
        "image": "28x28 grayscale (Fashion-MNIST test)",
        "timings": timings,
        "ratio_100_to_1_keys": timings[f"{args.keys}_keys_pullback_False"]["seconds"]
        / timings["1_keys_pullback_False"]["seconds"],
        "command": "python -m bench.verify_time",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"verify-time-{stamp}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
