"""The GPU benchmark: one command, at most 8 minutes on one H100 (issue #14, item 6).

    bash bench/gpu.sh             # on the lent GPU machine (installs the carried wheels first)
    python -m bench.gpu --smoke   # the same code on the CPU in seconds (run by make test)

What it measures, in order of importance, writing its result file after every stage (so a run cut
off by the time limit still reports everything it finished):

1. Fashion-MNIST 60k, ResNet-18 (small stem) marker; for every registered marking method asked
   for (``--methods``; the paper's ``radioactive`` by default) a fresh key marks q ∈ {1, 10}% of
   the training images; ResNet-18 suspects trained from scratch as a data user would (crop + flip,
   one-cycle) on the clean set (q = 0) and on each marked set; one cross-architecture suspect
   (``slimresnet``) at q = 10%; every suspect verified through the library's verification seam
   (``prepare`` + ``score`` + ``combine``) with every test its record's method names.
2. Marking throughput at 224 px (ResNet-18, 90 steps, bf16) against the same-run upper bound of
   ``shared/tools/mark_roofline.py`` (carried with the command).
3. The glyph set at C = 1000 (paper's headline regime: many classes), when time is left.

Marking happens in memory on the GPU through the method's own ``mark`` (the code ``radmark mark``
runs per batch), not through shard files: shard I/O is not what this run is for. Records are the
real signed mark records, written to a throw-away keystore; kits are built with ``build_kit``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    """Sizes of one run: the real one on a GPU, a tiny smoke one on the CPU."""

    train: int | None  # images per split (None: the whole split)
    test: int | None
    probe: int
    marker_arch: str
    marker_epochs: int
    suspect_epochs: int
    cross_arch: str
    steps: int | None  # marking steps (None: the method's preset)
    batch: int
    kit_decoys: int
    kit_per_class: int
    fractions: tuple[float, ...]
    glyph_classes: int
    glyph_epochs: int
    throughput: bool
    budget_s: float
    pullback_limit: int


GPU = Scale(
    train=None, test=None, probe=5000, marker_arch="resnet18", marker_epochs=8,
    suspect_epochs=12, cross_arch="slimresnet", steps=None, batch=512, kit_decoys=39,
    kit_per_class=10, fractions=(0.01, 0.10), glyph_classes=1000, glyph_epochs=10,
    throughput=True, budget_s=440.0, pullback_limit=2000,
)  # fmt: skip
SMOKE = Scale(
    train=400, test=300, probe=260, marker_arch="smallcnn", marker_epochs=1, suspect_epochs=1,
    cross_arch="slimresnet", steps=2, batch=64, kit_decoys=2, kit_per_class=1,
    fractions=(0.05, 0.5), glyph_classes=10, glyph_epochs=1, throughput=False, budget_s=600.0,
    pullback_limit=60,
)  # fmt: skip


class Run:
    """The result file, rewritten after every stage; the clock that decides what still fits."""

    def __init__(self, out: Path, scale: Scale, args: argparse.Namespace) -> None:
        self.t0 = time.perf_counter()
        self.scale = scale
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        kind = "gpu-smoke" if args.smoke else "gpu"
        self.path = out / f"{kind}-{stamp}.json"
        out.mkdir(parents=True, exist_ok=True)
        self.res: dict[str, Any] = {
            "kind": kind,
            "started": stamp,
            "command": " ".join(sys.argv),
            "scale": scale.__dict__,
            "stages": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.scale.budget_s

    def stage(self, name: str, value: Any) -> None:
        self.res["stages"][name] = value
        self.res["elapsed_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.res, indent=1, default=_jsonable) + "\n")
        print(f"[{self.elapsed():7.1f}s] {name}: {_short(value)}", flush=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def _short(v: Any) -> str:
    text = json.dumps(v, default=_jsonable)
    return text if len(text) < 400 else text[:400] + "..."


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ---------------------------------------------------------------------------------------- data


def load_fmnist(root: Path, scale: Scale) -> dict[str, np.ndarray]:
    from bench import fmnist

    out = {}
    npz = np.load(root) if root.suffix == ".npz" else None  # the embedded subset (smoke runs)
    for split, n in (("train", scale.train), ("test", scale.test)):
        if npz is not None:
            x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
        else:
            x, y = fmnist.load(split, root)
        if n is not None:  # class-balanced subset for the smoke run
            idx = np.concatenate([np.flatnonzero(y == c)[: n // 10] for c in range(10)])
            x, y = x[np.sort(idx)], y[np.sort(idx)]
        out[f"{split}_x"], out[f"{split}_y"] = x[:, None].copy(), y.astype(np.int64)
    return out


def write_probe(images: np.ndarray, labels: np.ndarray, where: Path) -> list[str]:
    from radmark.data.writer import write_dataset

    write_dataset(images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1),
                  labels.tolist(), where, samples_per_shard=5000)  # fmt: skip
    return [str(where)]


# ------------------------------------------------------------------------------------ training


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    arch: str,
    num_classes: int,
    epochs: int,
    seed: int,
    device: str,
    batch: int,
    flip: bool = True,
    init: Any = None,
) -> tuple[Any, tuple[float, ...], tuple[float, ...], float]:
    """A data user's training run: SGD + Nesterov, one-cycle, random crop (pad 4) [+ flip].

    The recipe of ``radmark.models.training.train_classifier``, on the GPU with the data resident
    in device memory, bf16 autocast and channels-last (what makes 60k × 12 epochs take seconds).
    ``init``: a model to fine-tune instead of a fresh one.
    """
    import torch
    import torch.nn.functional as F

    from radmark.models import build_model

    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, c, h, w = images.shape
    small_stem = arch.startswith("resnet") and max(h, w) <= 64
    model = init if init is not None else build_model(
        arch, num_classes, small_stem=small_stem, in_chans=c)  # fmt: skip
    cuda = device.startswith("cuda")
    model = model.to(device).to(memory_format=torch.channels_last) if cuda else model.to(device)
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    xf = x_all.float().div_(255.0)
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    del xf
    m_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    lr = 0.05 if init is None else 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)  # fmt: skip
    steps = math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps,
                                                pct_start=0.15)  # fmt: skip
    correct = total = 0
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        correct = total = 0
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            xb = _crop_flip(x_all[idx].float().div_(255.0), gen, flip)
            yb = y_all[idx]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model((xb - m_t) / s_t)
                loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
            total += int(yb.numel())
    model.eval()
    return (
        model.float().to(memory_format=torch.contiguous_format),
        mean,
        std,
        correct / max(total, 1),
    )


def _crop_flip(x: Any, gen: Any, flip: bool, pad: int = 4) -> Any:
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)
    cols = dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w)
    out = xp[torch.arange(b, device=x.device).view(b, 1, 1), :, rows.view(b, h, 1),
             cols.view(b, 1, w)].permute(0, 3, 1, 2)  # fmt: skip
    if not flip:
        return out
    coin = torch.rand(b, generator=gen, device=x.device) < 0.5
    return torch.where(coin.view(b, 1, 1, 1), out.flip(3), out)


def accuracy(model: Any, mean: Any, std: Any, x: np.ndarray, y: np.ndarray, device: str) -> float:
    import torch

    m_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 2048):
            xb = torch.from_numpy(x[i : i + 2048]).to(device).float().div_(255.0)
            correct += int(
                (model((xb - m_t) / s_t).argmax(1).cpu().numpy() == y[i : i + 2048]).sum()
            )
    return correct / len(x)


def save(
    model: Any, path: Path, arch: str, num_classes: int, mean: Any, std: Any, small: bool
) -> Path:
    from radmark.models import save_model

    save_model(model.cpu(), path, arch=arch, num_classes=num_classes, small_stem=small,
               mean=mean, std=std)  # fmt: skip
    return path


def trained(data: dict[str, np.ndarray], x: np.ndarray, *, arch: str, classes: int, epochs: int,
            seed: int, device: str, scale: Scale, path: Path, flip: bool = True,
            init: Any = None) -> dict[str, Any]:  # fmt: skip
    """Train, measure train/test accuracy and the gap, save as safetensors."""
    t = time.perf_counter()
    model, mean, std, train_acc = train(x, data["train_y"], arch=arch, num_classes=classes,
                                        epochs=epochs, seed=seed, device=device,
                                        batch=scale.batch, flip=flip, init=init)  # fmt: skip
    seconds = time.perf_counter() - t
    test_acc = accuracy(model, mean, std, data["test_x"], data["test_y"], device)
    small = arch.startswith("resnet") and x.shape[-1] <= 64
    save(model, path, arch, classes, mean, std, small)
    return {"path": path, "arch": arch, "epochs": epochs, "seconds": round(seconds, 1),
            "train_acc_running": round(train_acc, 4), "test_acc": round(test_acc, 4),
            "gap": round(train_acc - test_acc, 4)}  # fmt: skip


# ------------------------------------------------------------------------------------- marking


def mark_in_memory(
    store_root: Path, marker_path: Path, x: np.ndarray, y: np.ndarray, *, method: str,
    fraction: float, num_classes: int, scale: Scale, device: str, keys: list[str],
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Mark ``fraction`` of (x, y) with a fresh key through the method's own ``mark``; sign the
    real mark record into the keystore at ``store_root``. Returns the marked copy and a summary."""
    import torch

    from radmark.keys.manage import generate_key, load_secret_key
    from radmark.keys.records import MarkerRef, ShardRef, mark_record_body
    from radmark.keys.store import Keystore
    from radmark.marking.methods import get_method
    from radmark.marking.selection import SELECTION_RULE, is_selected
    from radmark.models import load_model

    t0 = time.perf_counter()
    fp = generate_key(store_root, passphrase=None, scrypt_n=2**10).fingerprint
    key, pub = load_secret_key(store_root, fp, lambda: None)
    m = get_method(method)
    overrides = {"steps": scale.steps} if scale.steps else {}
    params = m.params("default", overrides)
    marker = load_model(str(marker_path), device=device)
    run = m.start(key, marker, num_classes, params, device=device)
    seed = key.selection_seed()
    chosen = np.array([i for i, k in enumerate(keys) if is_selected(seed, k, fraction)])
    out = x.copy()
    gen = torch.Generator(device=torch.device(device).type).manual_seed(0)
    psnrs, coss = [], []
    bs = 512 if device.startswith("cuda") else 64
    for i in range(0, len(chosen), bs):
        idx = chosen[i : i + bs]
        res = run.mark(torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device),
                       [keys[j] for j in idx], generator=gen)  # fmt: skip
        out[idx] = res.images.cpu().numpy()
        psnrs.append(res.psnr.cpu().numpy())
        coss.append(res.feature_cos.cpu().numpy())
    seconds = time.perf_counter() - t0
    ps = np.concatenate(psnrs) if psnrs else np.zeros(0)
    changed = int(np.sum(np.any(out[chosen] != x[chosen], axis=(1, 2, 3)))) if len(chosen) else 0
    store = Keystore.open(store_root)
    private = [store.put_kit(blob) for blob in run.private_data()]
    fields = run.record_fields(private)
    body = mark_record_body(
        key_fingerprint=pub.fingerprint, method=m.name,
        marker=MarkerRef(marker.identity, marker.name, marker.arch, marker.sha256, marker.dim,
                         str(marker_path)),
        num_classes=num_classes, carriers=fields.get("carriers"),
        params=m.params_to_record(params), fraction=fraction, selection_rule=SELECTION_RULE,
        label_field="cls", counts={"images": len(x), "marked": changed, "skipped": 0},
        shards=[ShardRef("in-memory", "", "0" * 64, len(x), changed, "")],
        method_data=fields.get("method_data"),
    )  # fmt: skip
    record = store.put(key.sign(body))
    finite = ps[np.isfinite(ps)]
    cos = np.concatenate(coss) if coss else np.zeros(0)
    return out, {
        "method": m.name, "fraction": fraction, "record": record, "marked": changed,
        "selected": int(len(chosen)), "seconds": round(seconds, 1),
        "image_steps_per_s": round(len(chosen) * getattr(params, "steps", 1) / max(seconds, 1e-9)),
        "psnr_mean": float(finite.mean()) if finite.size else None,
        "psnr_min": float(finite.min()) if finite.size else None,
        "feature_cos_mean": float(np.nanmean(cos)) if cos.size and np.isfinite(cos).any() else None,
    }  # fmt: skip


def verify_one(store_root: Path, suspect: Path, record: str, probe: list[str], device: str,
               black_box: bool, pullback_limit: int = 2000,
               excluded: set[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every test the record's method names that this evidence supports, through the seam."""
    from radmark.keys.store import Keystore
    from radmark.verify.choice import planned_tests
    from radmark.verify.evidence import EvidenceSettings, prepare
    from radmark.verify.run import score_record
    from radmark.verify.tests import combine

    t0 = time.perf_counter()
    store = Keystore.open(store_root)
    rec = store.mark_record(record)
    key = store.secret(rec.fingerprint, lambda: None)[0]
    settings = EvidenceSettings(device=device, pullback_limit=pullback_limit)
    evidence = prepare(str(suspect), store=store, probe=probe, settings=settings)
    offered = {"probe"} | ({"kit"} if black_box else set())
    names = planned_tests(rec, offered=offered, excluded=excluded or set())
    tests = score_record(evidence, rec, key, names)
    combined = combine(tests.values())
    return {
        "tests": {k: round(t.log10_p, 3) for k, t in tests.items()},
        "log10_p": round(combined / math.log(10), 3),
        "black_box_ranks": [int(r) for r in tests["black_box_rank"].units]
        if "black_box_rank" in tests else None,
        "alignment_r2": tests["white_box_fisher"].extra.get("alignment_r2")
        if "white_box_fisher" in tests else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "notes": evidence.notes,
    }  # fmt: skip


# ----------------------------------------------------------------------------------- the stages


def fmnist_cells(run: Run, args: argparse.Namespace, device: str, work: Path) -> None:
    from radmark.keys.store import Keystore
    from radmark.marking.kit import build_kit

    s = run.scale
    data = load_fmnist(args.data, s)
    keys = [f"{i:08d}" for i in range(len(data["train_x"]))]
    # kit images (marked with the true carriers) and the clean probe are disjoint parts of test
    ty = data["test_y"]
    kit_idx = np.sort(
        np.concatenate([np.flatnonzero(ty == c)[: s.kit_per_class] for c in range(10)])
    )
    rest = np.setdiff1d(np.arange(len(ty)), kit_idx)[: s.probe]
    probe = write_probe(data["test_x"][rest], ty[rest], work / "probe")
    kit_probe = write_probe(data["test_x"][kit_idx], ty[kit_idx], work / "kitprobe")
    run.stage("fmnist.data", {"train": len(keys), "test": len(data["test_y"]), "probe": s.probe})
    marker = trained(data, data["train_x"], arch=s.marker_arch, classes=10,
                     epochs=s.marker_epochs, seed=0, device=device, scale=s,
                     path=work / "marker.safetensors")  # fmt: skip
    run.stage("fmnist.marker", marker)
    ks = work / "keys"
    marked: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        for q in s.fractions:
            name = f"{method}-q{round(100 * q)}"
            x, summary = mark_in_memory(ks, marker["path"], data["train_x"], data["train_y"],
                                        method=method, fraction=q, num_classes=10, scale=s,
                                        device=device, keys=keys)  # fmt: skip
            if method == "radioactive":
                store = Keystore.open(ks)
                kit = build_kit(store=store, record=store.mark_record(summary["record"]),
                                key=store.secret(store.mark_record(summary["record"]).fingerprint,
                                                 lambda: None)[0],
                                probe=kit_probe, decoys=s.kit_decoys, per_class=s.kit_per_class,
                                device=device)  # fmt: skip
                summary["kit_seconds"] = round(kit.seconds, 1)
            marked[name] = {"x": x, **summary}
            run.stage(f"fmnist.mark.{name}", summary)
    suspects = {"control": data["train_x"], **{k: v["x"] for k, v in marked.items()}}
    results: dict[str, Any] = {}
    for name, x in suspects.items():
        if not run.fits(60):
            run.stage(f"fmnist.suspect.{name}", {"skipped": "time budget"})
            continue
        sus = trained(data, x, arch=s.marker_arch, classes=10, epochs=s.suspect_epochs, seed=1,
                      device=device, scale=s, path=work / f"suspect-{name}.safetensors")  # fmt: skip
        results[name] = sus
        run.stage(f"fmnist.suspect.{name}", sus)
    cross = next((k for k in marked if k.endswith(f"q{round(100 * s.fractions[-1])}")), None)
    if cross is not None and run.fits(40):
        sus = trained(data, marked[cross]["x"], arch=s.cross_arch, classes=10,
                      epochs=s.suspect_epochs, seed=2, device=device, scale=s,
                      path=work / f"suspect-{cross}-{s.cross_arch}.safetensors")  # fmt: skip
        results[f"{cross}-{s.cross_arch}"] = sus
        run.stage(f"fmnist.suspect.{cross}-{s.cross_arch}", sus)
    verdicts: dict[str, Any] = {}
    for sname, sus in results.items():
        # the control against every record (a null check); a marked suspect against its own
        own = [k for k in marked if sname in (k, f"{k}-{s.cross_arch}")]
        targets = list(marked) if sname == "control" else own
        for mname in targets:
            if not run.fits(15):
                break
            rec = marked[mname]["record"]
            v = verify_one(ks, sus["path"], rec, probe, device,
                           black_box=mname.startswith("radioactive"),
                           pullback_limit=s.pullback_limit)  # fmt: skip
            verdicts[f"{sname} vs {mname}"] = v
            run.stage(f"fmnist.verify.{sname}.vs.{mname}", v)
    run.stage("fmnist.summary", {
        "suspects": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in results.items()},
        "verify": verdicts,
    })  # fmt: skip


def throughput(run: Run, args: argparse.Namespace, device: str, work: Path) -> None:
    """Marking at 224 px (ResNet-18, 90 steps, bf16) vs the same-run roofline."""
    import torch

    from radmark.marking.presets import get_preset
    from radmark.marking.radioactive import mark_batch
    from radmark.models import build_model, load_model, save_model

    cuda = device.startswith("cuda")
    size, b = (224, 256) if cuda else (32, 4)  # the smoke run only exercises the code path
    torch.manual_seed(0)
    path = work / "resnet18-224.safetensors"
    save_model(build_model("resnet18", 1000).eval(), path, arch="resnet18", num_classes=1000)
    marker = load_model(str(path), device=device)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    u = torch.nn.functional.normalize(torch.randn(1000, 512, device=device), dim=1)
    params = get_preset("default", steps=10 if cuda else 1)
    gen = torch.Generator(device=device).manual_seed(0)
    ours: dict[str, Any] = {"batch": b, "size": size, "steps_timed": params.steps,
                            "dtype": "bf16 autocast" if cuda else "float32"}  # fmt: skip
    for layout in ("nchw", "channels_last") if cuda else ("nchw",):
        if layout == "channels_last":
            marker.model.to(memory_format=torch.channels_last)
        feats = marker.features if layout == "nchw" else (
            lambda z: marker.features(z.contiguous(memory_format=torch.channels_last)))  # fmt: skip
        dtype = torch.bfloat16 if cuda else None
        mark_batch(x, y, u, feats, params, generator=gen, autocast_dtype=dtype)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        reps = 2
        for _ in range(reps):
            mark_batch(x, y, u, feats, params, generator=gen, autocast_dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        rate = b * params.steps * reps / (time.perf_counter() - t)  # image-steps/s
        ours[layout] = {
            "image_steps_per_s": round(rate),
            "images_per_s_90_steps": round(rate / 90, 1),
        }
    ours["images_per_s_90_steps"] = max(v["images_per_s_90_steps"] for k, v in ours.items()
                                        if k in ("nchw", "channels_last"))  # fmt: skip
    run.stage("throughput.radmark", ours)
    roof_path = args.roofline
    if roof_path is None or not Path(roof_path).exists():
        run.stage("throughput.roofline", {"skipped": f"no roofline script at {roof_path}"})
        return
    from bench.throughput import parse_last_json

    try:
        proc = subprocess.run([sys.executable, str(roof_path), "224"], capture_output=True,
                              text=True, timeout=max(30.0, min(150.0, s_left(run))))  # fmt: skip
        roof = parse_last_json(proc.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        run.stage("throughput.roofline", {"failed": repr(exc)[:300]})
        return
    best = max(v for k, v in roof.items() if k.endswith("_img_per_s_90steps"))
    run.stage("throughput.roofline", {
        **roof, "bound_img_per_s_90steps": best,
        "fraction_of_bound": round(ours["images_per_s_90_steps"] / best, 3) if best else None,
    })  # fmt: skip


def s_left(run: Run) -> float:
    return run.scale.budget_s - run.elapsed()


def build_glyphs(args: argparse.Namespace, s: Scale) -> None:
    """The glyph set as arrays in ``args.glyph_file`` (numpy only: runs on the CPU)."""
    from bench import glyphs

    if args.masters:
        masters = glyphs.load_masters(args.masters)
    elif args.smoke:  # no fonts needed: blocky synthetic glyphs exercise the same code
        masters = glyphs.synthetic_masters(s.glyph_classes, 5)
    else:
        masters = None
    kw = {"n_train": 600, "n_test": 300} if args.smoke else {}
    g = glyphs.make_glyph_dataset(s.glyph_classes, seed=0, masters=masters, **kw)
    args.glyph_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.glyph_file.with_suffix(".tmp.npz")
    np.savez(tmp, train_x=g.train_images[:, None], train_y=g.train_labels,
             test_x=g.test_images[:, None], test_y=g.test_labels, sha256=g.sha256)  # fmt: skip
    tmp.replace(args.glyph_file)


def glyph_cells(run: Run, args: argparse.Namespace, device: str, work: Path) -> None:
    """The paper's regime: many classes (glyphs, C classes), radioactive at q = 1%."""
    s = run.scale
    t = time.perf_counter()
    if args.glyph_proc is not None:  # built on the CPU while the GPU trained (see main)
        args.glyph_proc.wait(timeout=max(10.0, s_left(run)))
    if not args.glyph_file.exists():
        build_glyphs(args, s)
    z = np.load(args.glyph_file)
    data = {"train_x": z["train_x"], "train_y": z["train_y"], "test_x": z["test_x"],
            "test_y": z["test_y"]}  # fmt: skip
    run.stage("glyphs.data", {"classes": s.glyph_classes, "sha256": str(z["sha256"]),
                              "train": len(data["train_y"]),
                              "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
    marker = trained(data, data["train_x"], arch=s.marker_arch, classes=s.glyph_classes,
                     epochs=s.glyph_epochs, seed=0, device=device, scale=s, flip=False,
                     path=work / "glyph-marker.safetensors")  # fmt: skip
    run.stage("glyphs.marker", marker)
    keys = [f"{i:08d}" for i in range(len(data["train_y"]))]
    x, summary = mark_in_memory(work / "glyph-keys", marker["path"], data["train_x"],
                                data["train_y"], method="radioactive", fraction=0.01,
                                num_classes=s.glyph_classes, scale=s, device=device,
                                keys=keys)  # fmt: skip
    run.stage("glyphs.mark.q1", summary)
    n_probe = min(len(data["test_y"]), 10 * 512 if s.train is None else len(data["test_y"]))
    probe = write_probe(data["test_x"][:n_probe], data["test_y"][:n_probe], work / "glyph-probe")
    for name, xs in (("q1", x), ("control", data["train_x"])):
        if not run.fits(45):
            run.stage(f"glyphs.suspect.{name}", {"skipped": "time budget"})
            continue
        sus = trained(data, xs, arch=s.marker_arch, classes=s.glyph_classes,
                      epochs=s.glyph_epochs, seed=1, device=device, scale=s, flip=False,
                      path=work / f"glyph-suspect-{name}.safetensors")  # fmt: skip
        # the paper's white-box test is what C = 1000 is about; the pull-back test would cost a
        # Jacobian product per class (1000 of them), so it is left to the CPU map
        v = verify_one(
            work / "glyph-keys",
            sus["path"],
            summary["record"],
            probe,
            device,
            False,
            excluded={"pullback_fisher"},
        )
        run.stage(f"glyphs.{name}", {"suspect": {k: w for k, w in sus.items() if k != "path"},
                                     "verify": v})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (make test)")
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--masters", type=Path, default=None, help="glyph masters (.npz)")
    ap.add_argument("--roofline", type=Path, default=None, help="mark_roofline.py")
    ap.add_argument("--methods", default="radioactive,twins", help="comma-separated methods")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "gpu")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    ap.add_argument("--build-glyphs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.glyph_file = args.work / "glyphs.npz"
    args.glyph_proc = None
    if args.build_glyphs:  # the child process main() starts (below)
        build_glyphs(args, SMOKE if args.smoke else GPU)
        return 0
    args.methods = [m for m in args.methods.split(",") if m]
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("bench.gpu needs a GPU (use --smoke to check it on the CPU)")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scale = SMOKE if args.smoke else GPU
    run = Run(args.out, scale, args)
    run.stage("environment", environment(device))
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    if "glyphs" not in skip and not args.glyph_file.exists():  # CPU work, overlapped with the GPU
        cmd = [sys.executable, "-m", "bench.gpu", "--build-glyphs", "--work", str(args.work)]
        cmd += (["--smoke"] if args.smoke else []) + (
            ["--masters", str(args.masters)] if args.masters else [])  # fmt: skip
        args.glyph_proc = subprocess.Popen(cmd, cwd=REPO)
    for name, fn, need in (("fmnist", fmnist_cells, 0), ("throughput", throughput, 60),
                           ("glyphs", glyph_cells, 120)):  # fmt: skip
        if name in skip:
            continue
        if not run.fits(need):
            run.stage(name, {"skipped": f"time budget ({run.elapsed():.0f} s used)"})
            continue
        try:
            fn(run, args, device, args.work / name)
        except Exception as exc:  # a failed stage is a result too; the next one still runs
            run.stage(f"{name}.failed", {"error": f"{type(exc).__name__}: {exc}"[:500]})
    run.stage("done", {"seconds": round(run.elapsed(), 1), "result_file": run.path.name})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
