"""Marking throughput, end to end: read shards, mark, write shards, at 224×224 with a ResNet-18.

    python -m bench.throughput --device cuda --roofline ../shared/tools/mark_roofline.py --json

Builds ``--images`` 224×224 RGB images (Fashion-MNIST upscaled bilinearly and replicated to three
channels) as WebDataset shards with the project's writer, saves a ResNet-18 marker (standard
ImageNet stem, randomly initialised with a fixed seed: the cost of a step does not depend on the
weights) and marks every image with ``radmark mark --fraction 1 --steps 90``. images/s is taken
from ``mark --json`` (the library's own clock, whole run) and from the wall time of the command.

With ``--roofline PATH`` (CUDA only) the roofline script is run in the same job as a subprocess;
it times forward + input-gradient steps of a bare ResNet-18 at 224 px in fp32, bf16 and bf16 +
torch.compile, and its best 90-step rate is the upper bound the end-to-end rate is compared with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import fmnist

REPO = Path(__file__).resolve().parent.parent


def parse_last_json(text: str) -> dict[str, Any]:
    """The last complete JSON object in ``text`` (the roofline prints partial ones first)."""
    dec = json.JSONDecoder()
    last: dict[str, Any] | None = None
    i = 0
    while True:
        i = text.find("{", i)
        if i < 0:
            break
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict):
            last = obj
        i = end
    if last is None:
        raise ValueError("no JSON object in the roofline's output")
    return last


def make_images(n: int, size: int, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    images, labels = fmnist.load("train", data_dir)
    x = torch.from_numpy(np.array(images[:n])).float().unsqueeze(1)
    out = []
    for i in range(0, n, 64):
        up = F.interpolate(x[i : i + 64], size=(size, size), mode="bilinear", align_corners=False)
        out.append(up.round().clamp(0, 255).to(torch.uint8))
    y = torch.cat(out).squeeze(1).numpy()
    return np.repeat(y[..., None], 3, axis=3), labels[:n]


def run_roofline(path: str, size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, path, str(size)], capture_output=True, text=True, check=False
    )
    out: dict[str, Any] = {"script": path, "rc": r.returncode, "wall_s": time.perf_counter() - t0}
    try:
        out["result"] = parse_last_json(r.stdout)
    except ValueError:
        out["error"] = (r.stderr or r.stdout)[-2000:]
        return out
    rates = {
        k[: -len("_img_per_s_90steps")]: v
        for k, v in out["result"].items()
        if k.endswith("_img_per_s_90steps") and isinstance(v, (int, float))
    }
    if rates:
        best = max(rates, key=lambda k: rates[k])
        out["bound_img_per_s"] = rates[best]
        out["bound_precision"] = best
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="end-to-end marking throughput at 224x224")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "throughput")
    ap.add_argument("--data", type=Path, default=fmnist.DEFAULT_DIR)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=None, help="default 2048 (cuda) / 8 (cpu)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (cuda) / 8 (cpu)")
    ap.add_argument("--roofline", default=None, help="path to mark_roofline.py (CUDA only)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)

    import torch

    from radmark.data.writer import write_dataset
    from radmark.models import build_model, save_model

    cuda = args.device.startswith("cuda")
    n = args.images or (2048 if cuda else 8)
    bs = args.batch_size or (256 if cuda else 8)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n, args.size, args.data)
    shards = work / "shards"
    write_dataset(images, labels.tolist(), shards, prefix="fmnist224", samples_per_shard=512)
    torch.manual_seed(0)
    marker = work / "resnet18-224.safetensors"
    save_model(build_model("resnet18", 10), marker, arch="resnet18", num_classes=10)
    radmark = str(Path(sys.executable).with_name("radmark"))
    ks, key = work / "keystore", work / "owner.key"
    subprocess.run(
        [radmark, "keygen", "--keystore", str(ks), "--no-passphrase", "--out", str(key), "--json"],
        check=True,
        capture_output=True,
    )
    cmd = [
        radmark,
        "mark",
        str(shards),
        "--key",
        str(key),
        "--keystore",
        str(ks),
        "--out",
        str(work / "marked"),
        "--marker",
        str(marker),
        "--fraction",
        "1.0",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(bs),
        "--device",
        args.device,
        "--json",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"radmark mark failed ({r.returncode}): {r.stderr[-2000:]}")
    mk = json.loads(r.stdout)
    res: dict[str, Any] = {
        "size": args.size,
        "images": n,
        "steps": args.steps,
        "batch_size": bs,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "images_per_s": mk["images_per_s"],
        "wall_images_per_s": n / wall,
        "wall_s": wall,
        "psnr_mean": mk["psnr_mean"],
        "command": cmd,
        "marker": "resnet18 (standard stem, random init, seed 0)",
    }
    if args.roofline and cuda:
        roof = run_roofline(args.roofline, args.size)
        res["roofline"] = roof
        if roof.get("bound_img_per_s"):
            res["fraction_of_bound"] = mk["images_per_s"] / roof["bound_img_per_s"]
    elif args.roofline:
        res["roofline"] = {"skipped": "the roofline needs CUDA"}
    print(json.dumps(res) if args.json else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
