"""Marked-probe bias of the white-box test at C = 1000 (issue #17 item 1), and a cross-fit prototype.

The white-box test fits X with F_m X ≈ F_s on the probe and tests cos(W_s Xᵀ row c, u_c). If the
probe holds images marked with the key under test, X depends on the carriers and the per-class
cosines are biased toward detection. This script measures that bias on a CLEAN suspect at
C = 1000 (glyphs, smallcnn marker and suspect, d = 128), for probes that are:

  a    clean (the first PER_CLASS test images of every class), and a90/a75 the same clean probe
       re-encoded as JPEG quality 90/75 (the baseline for c: JPEG itself moves the features);
  b    100 % marked with key k, lossless (what radmark/verify/guard.py refuses);
  c90  b re-encoded as JPEG q = 90, c75 as q = 75 (what the guard cannot see);
  d    10 % marked (the key's own selection rule, is_selected(selection seed, __key__, 0.1));
  dc90 d re-encoded as JPEG q = 90, dc75 as q = 75 (a lossy copy of a 10 %-marked release);
  e    control: each marked probe scored with keys that did not mark it (should show no bias).

The guard's pixel-digest check (check_probe_pixels, with the digests a marking run records) is run
on every probe, and its verdict is stored.

Marking is the library's (``mark_batch`` with the radioactive method's ``default`` preset, the
carriers a mark record of key k derives via ``carriers_for``); scoring is the library's
(``Evidence`` + ``WhiteBoxTest.run``, uncentred alignment as the verification plan's default).
Keys are real ``SecretKey``s from fixed 32-byte secrets (sha256 of a label) so a re-run derives
the same carriers; each has a signed mark record in a scratch keystore under --work.

Marking can use another preset (--preset paper). Controls: every marked probe is also scored with
the other experiment keys and --control-keys unrelated keys, which marked nothing.

From the measured mean per-class bias b (in null-sd units, 1/√d) it estimates the probability that
a clean model reaches p < 1e-3: a normal (CLT) approximation of the exact cosine null shifted by b
and combined with Fisher, checked by a Monte Carlo; the χ² shift of the measured Fisher statistic
is stored too. With --crossfit it also scores a prototype immunity (not in radmark/). Class c's
row is mapped with an alignment fitted on the probe images of the other classes only (a downdate
of the normal equations per class). It is checked for (1) bias under b/c/d/dc, (2) per-class
calibration on a clean probe (KS over classes × --null-keys keys), and (3) power on a marked
suspect when one is given (--marked-suspect, with copies of its keystore and key file). It also
yields the paired estimate of the standard test's bias: the standard shift minus the cross-fit
shift. The cross-fit shift has mean exactly 0, so this is a control variate with a SE about 20
times smaller.

Marked probes are cached under --work (npz, one per key, saved every 8 batches), so the run is
resumable, and the per-class cosines are saved next to --out (.per_class.npz). Commands used (from
the repository root, OMP_NUM_THREADS=1, on a shared 2-core CPU; see bench/experiments/README.md):

    python -m bench.experiments.probe_bias \\
        --marker MAP/marker/glyphs1000-4c4b420a3e2a/marker.safetensors \\
        --suspect MAP/suspect/glyphs1000-60k.scratch.clean.q0.s0-c1e691fcfd3c/suspect.safetensors \\
        --test MAP/data/glyphs1000-60k-833095572f75/test --per-class 5 --keys 2 \\
        --null-keys 200 --control-keys 50 --crossfit \\
        --marked-suspect MAP/suspect/glyphs1000-60k.scratch.radioactive.q1.s1-45c65d595171/suspect.safetensors \\
        --marked-keystore bench/work/probe_bias/marked_keystore \\
        --marked-keyfile bench/work/probe_bias/marked_owner.key \\
        --work bench/work/probe_bias --out bench/work/probe_bias/probe_bias_c1000.json
    # and the same with --keys 1 --preset paper --work bench/work/probe_bias_paper (no marked suspect)

with MAP = /work/main/bench/work/map (models copied under --work/models before use). Smoke test
(about 40 s): --per-class 1 --keys 2 --null-keys 5 --control-keys 3 --steps 2 --reps 2000.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from radmark.data.writer import sha256_file

C = 1000
JPEG_QUALITIES = (90, 75)
# probe conditions scored against their baseline (the clean probe, JPEG'd alike where the marked
# one is): b, d lossless; c, dc re-encoded (what the guard cannot see)
CONDS = ("b", "d", *(f"c{q}" for q in JPEG_QUALITIES), *(f"dc{q}" for q in JPEG_QUALITIES))
BASE_OF = {"b": "a", "d": "a", **{f"{k}{q}": f"a{q}" for k in ("c", "dc") for q in JPEG_QUALITIES}}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str:
    """HEAD, with "+dirty" when the working tree differs (this script uncommitted while running)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------- keys and records
def experiment_key(i: int) -> Any:
    from radmark.keys.keypair import SecretKey

    return SecretKey(hashlib.sha256(f"radmark/probe-bias/key/{i}".encode()).digest())


def make_records(store_dir: Path, marker_path: Path, n: int) -> list[tuple[Any, Any]]:
    """(record, key) for keys 0..n-1: signed mark records of the real key, as make_record does."""
    from radmark.keys.carriers import CARRIER_FORMAT, carriers_digest, derive_carriers
    from radmark.keys.records import MarkerRef, mark_record_body
    from radmark.keys.store import Keystore
    from radmark.marking.radioactive import get_preset
    from radmark.marking.selection import SELECTION_RULE
    from radmark.models import load_model

    marker = load_model(str(marker_path))
    store = Keystore.open(store_dir, create=True)
    have = {r.key.fingerprint: r for r in store.mark_records()}
    out = []
    for i in range(n):
        key = experiment_key(i)
        pub = key.public_record()
        if pub.fingerprint not in have:
            store.add_key(key, pub, None, scrypt_n=2**10)
            u = derive_carriers(key.carrier_seed(), marker.dim, C, marker.identity)
            body = mark_record_body(
                key_fingerprint=pub.fingerprint,
                method="radioactive",
                marker=MarkerRef(
                    marker.identity,
                    marker.name,
                    marker.arch,
                    marker.sha256,
                    marker.dim,
                    str(marker_path),
                ),
                num_classes=C,
                carriers={"format": CARRIER_FORMAT, "sha256": carriers_digest(u)},
                params=get_preset("default").to_dict(),
                fraction=1.0,
                selection_rule=SELECTION_RULE,
                label_field="cls",
                counts={"images": 0, "marked": 0, "skipped": 0},
                shards=[],
            )
            have[pub.fingerprint] = store.mark_record(store.put(key.sign(body)))
        out.append((have[pub.fingerprint], key))
    return out


# ---------------------------------------------------------------------------- probe and marking
def load_probe_split(test: str, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first ``per_class`` images of every class, in file order: uint8 [N,1,H,W], labels, keys."""
    from radmark.data.arrays import load_labelled_images

    d = load_labelled_images([test])
    idx = np.sort(np.concatenate([np.flatnonzero(d.labels == k)[:per_class] for k in range(C)]))
    return d.images[idx].copy(), d.labels[idx].copy(), [d.keys[i] for i in idx]


def mark_probe(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    carriers: np.ndarray,
    marker: Any,
    key_index: int,
    steps: int | None = None,
    batch: int = 64,
    preset: str = "default",
) -> dict[str, np.ndarray]:
    """Every probe image marked with the key (``preset``), resumable: cached in ``path``."""
    import torch

    from radmark.marking.radioactive import get_preset, mark_batch

    params = get_preset(preset) if steps is None else get_preset(preset, steps=steps)
    n = images.shape[0]
    if path.exists():
        z = dict(np.load(path))
        if int(z["done"]) >= n:
            return z
    else:
        z = {"images": images.copy(), "psnr": np.zeros(n), "cos": np.zeros(n), "done": np.int64(0)}
    u = torch.from_numpy(carriers)
    t0, start = time.perf_counter(), int(z["done"])
    for b0 in range(start, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        gen = torch.Generator().manual_seed(1_000_003 * key_index + b0)
        r = mark_batch(
            torch.from_numpy(images[sl]),
            torch.from_numpy(labels[sl]),
            u,
            marker.features,
            params,
            generator=gen,
        )
        z["images"][sl] = r.images.numpy()
        z["psnr"][sl] = r.psnr.numpy()
        z["cos"][sl] = r.feature_cos.numpy()
        z["done"] = np.int64(sl.stop)
        if (b0 // batch) % 8 == 7 or sl.stop == n:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **z)
            os.replace(tmp, path)
            rate = (sl.stop - start) * params.steps / (time.perf_counter() - t0)
            log(f"  key {key_index}: marked {sl.stop}/{n} ({rate:.0f} image-steps/s)")
    return z


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Each image encoded as JPEG (PIL, 4:4:4 irrelevant: grayscale) and decoded by radmark."""
    from PIL import Image

    from radmark.data.images import decode_image

    out = np.empty_like(images)
    for i in range(images.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(images[i, 0], mode="L").save(buf, format="JPEG", quality=quality)
        out[i] = decode_image(buf.getvalue(), shard="jpeg", key=str(i)).transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------- scoring
def score(
    images: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    suspect: Any,
    store: Any,
    recs: list[tuple[Any, Any]],
    name: str,
) -> dict[str, Any]:
    """WhiteBoxTest.run for every key on one probe: cosines [K, C], log10 p [K], features."""
    from radmark.data.arrays import Probe
    from radmark.verify.evidence import Evidence, EvidenceSettings
    from radmark.verify.statistics import to_log10
    from radmark.verify.white_box import WhiteBoxTest

    ev = Evidence(
        suspect=suspect,
        store=store,
        probe=Probe(images, labels, keys, source=name),
        settings=EvidenceSettings(batch_size=256),
    )
    cos, lp, r2 = [], [], None
    for rec, key in recs:
        res = WhiteBoxTest().run(ev, rec, key)
        cos.append(np.asarray(res.units))
        lp.append(float(to_log10(res.log_p)))
        r2 = res.extra["alignment_r2"]
    from radmark.verify.alignment import map_classifier

    rec0 = recs[0][0]
    rows = map_classifier(ev.suspect_weight(), ev.alignment(rec0))
    return {
        "cos": np.stack(cos),
        "log10p": np.asarray(lp),
        "r2": r2,
        "rows": rows,
        "fm": ev.marker_features(rec0),
        "fs": ev.suspect_features(),
        "w": ev.suspect_weight(),
    }


def crossfit_rows(fm: np.ndarray, fs: np.ndarray, w: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Prototype: class c's row mapped with X fitted without the probe images of class c.

    Uncentred least squares through the normal equations G = F_mᵀF_m, B = F_mᵀF_s; for class c,
    X_c = (G − F_cᵀF_c)⁻¹(B − F_cᵀS_c) and the mapped row is X_c w_c (one solve per class).
    Returns unit rows [C, d_m].
    """
    g, b = fm.T @ fm, fm.T @ fs
    out = np.empty((w.shape[0], fm.shape[1]))
    for c in range(w.shape[0]):
        idx = labels == c
        fc, sc = fm[idx], fs[idx]
        v = b @ w[c] - fc.T @ (sc @ w[c])
        out[c] = np.linalg.solve(g - fc.T @ fc, v)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def full_rows(fm: np.ndarray, fs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The library's rows through the same normal equations (sanity check of the prototype)."""
    x = np.linalg.solve(fm.T @ fm, fm.T @ fs)
    m = w @ x.T
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def carriers(rec: Any, key: Any) -> np.ndarray:
    from radmark.verify.white_box import carriers_for

    return carriers_for(rec, key).astype(np.float64)


def fisher_log10(cos: np.ndarray, d: int) -> float:
    from radmark.verify.statistics import fisher_log_sf, log_cosine_sf, to_log10

    return float(to_log10(fisher_log_sf(log_cosine_sf(cos, d))))


# ---------------------------------------------------------------------------- null shifted by b
def p_below(b_sd: float, d: int, alpha: float = 1e-3, reps: int = 200_000, seed: int = 0) -> float:
    """P(Fisher p < alpha) for C classes whose cosines are exact null draws shifted by b_sd/√d.

    The exact null of one cosine: (c + 1)/2 ~ Beta((d−1)/2, (d−1)/2). ln p(c) is tabulated on a
    fine grid (log_cosine_sf, exact) and interpolated; the Fisher statistic −2 Σ ln p is compared
    with the χ²_{2C} critical value. b_sd = 0 reproduces alpha (checked in the output).
    """
    from scipy import stats

    from radmark.verify.statistics import log_cosine_sf

    grid = np.linspace(-0.6, 0.6, 240_001)
    table = log_cosine_sf(grid, d)
    crit = stats.chi2.isf(alpha, 2 * C)
    rng = np.random.default_rng(seed)
    a = (d - 1) / 2.0
    hits, chunk = 0, 2000
    for s in range(0, reps, chunk):
        m = min(chunk, reps - s)
        cos = 2.0 * rng.beta(a, a, size=(m, C)) - 1.0 + b_sd / math.sqrt(d)
        t = -2.0 * np.interp(cos, grid, table).sum(axis=1)
        hits += int((t > crit).sum())
    return hits / reps


def p_below_normal(b_sd: float, d: int, alpha: float = 1e-3) -> float:
    """P(Fisher p < alpha) by the CLT: T = Σ_c −2 ln p(x_c + b/√d), x_c exact null draws.

    The mean and variance of one term are integrated on a grid against the exact Beta density;
    T is then normal with C times each (C = 1000 terms, so the approximation is close; the Monte
    Carlo of :func:`p_below` checks it).
    """
    from scipy import stats

    from radmark.verify.statistics import log_cosine_sf

    a = (d - 1) / 2.0
    x = np.linspace(-0.7, 0.7, 400_001)
    w = stats.beta.pdf((x + 1) / 2, a, a) / 2
    w /= w.sum()
    g = -2.0 * log_cosine_sf(np.clip(x + b_sd / math.sqrt(d), -1, 1), d)
    m = float((w * g).sum())
    v = float((w * (g - m) ** 2).sum())
    g0 = -2.0 * log_cosine_sf(x, d)
    m0 = float((w * g0).sum())
    v0 = float((w * (g0 - m0) ** 2).sum())
    # standardised so that b = 0 gives alpha exactly: the threshold is z_alpha null sds above the
    # null mean; the shifted T has mean C·m and sd √(C·v)
    za = float(stats.norm.isf(alpha))
    z = (za * math.sqrt(C * v0) - C * (m - m0)) / math.sqrt(C * v)
    return float(stats.norm.sf(z))


def p_below_from_dt(delta_t: float, alpha: float = 1e-3) -> float:
    """P(χ²_{2C} + ΔT > crit): the measured mean shift of the Fisher statistic added to the null."""
    from scipy import stats

    return float(stats.chi2.sf(stats.chi2.isf(alpha, 2 * C) - delta_t, 2 * C))


def fisher_stat(cos: np.ndarray, d: int) -> float:
    from radmark.verify.statistics import log_cosine_sf

    return float(-2.0 * log_cosine_sf(cos, d).sum())


# ---------------------------------------------------------------------------- main
def summarise(shift: np.ndarray, d: int) -> dict[str, float]:
    """Per-class shifts [K, C] (raw cosine) → mean, SE over keys and classes, in raw and sd."""
    per_key = shift.mean(axis=1)
    se = float(shift.std(ddof=1) / math.sqrt(shift.size))
    return {
        "bias_cos": float(shift.mean()),
        "bias_cos_se": se,
        "bias_sd": float(shift.mean() * math.sqrt(d)),
        "bias_sd_se": se * math.sqrt(d),
        "bias_sd_per_key": [float(v * math.sqrt(d)) for v in per_key],
        "shift_spread_sd": float(shift.std(ddof=1) * math.sqrt(d)),
    }


def main() -> None:  # noqa: C901, PLR0915
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--marker", type=Path, required=True)
    ap.add_argument("--suspect", type=Path, required=True)
    ap.add_argument("--test", required=True, help="the glyph test split (shard directory)")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--null-keys", type=int, default=200, help="extra keys, scored only")
    ap.add_argument(
        "--control-keys",
        type=int,
        default=50,
        help="unrelated keys scored on every marked probe (control e)",
    )
    ap.add_argument("--crossfit", action="store_true")
    ap.add_argument("--marked-suspect", type=Path, default=None)
    ap.add_argument("--marked-keystore", type=Path, default=None)
    ap.add_argument("--marked-keyfile", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=50_000)
    ap.add_argument("--steps", type=int, default=None, help="override (smoke tests only)")
    ap.add_argument("--preset", default="default", help="marking preset of the marked probes")
    ap.add_argument("--work", type=Path, default=Path("bench/work/probe_bias"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from radmark.keys.store import Keystore
    from radmark.models import load_model
    from radmark.verify.statistics import log_cosine_sf

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    work = args.work
    (work / "models").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, src in (
        ("marker", args.marker),
        ("suspect", args.suspect),
        ("marked_suspect", args.marked_suspect),
    ):
        if src is None:
            continue
        dst = work / "models" / f"{name}.safetensors"
        if not dst.exists():
            shutil.copy2(src, dst)
            side = Path(str(src) + ".json")
            if side.exists():
                shutil.copy2(side, Path(str(dst) + ".json"))
        paths[name] = dst
    models = {
        k: {"source": str(getattr(args, k)), "sha256": sha256_file(p)} for k, p in paths.items()
    }
    log(f"models: {models}")

    recs = make_records(work / "keystore", paths["marker"], args.keys)
    store = Keystore.open(work / "keystore")
    marker = load_model(str(paths["marker"]))
    suspect = load_model(str(paths["suspect"]))
    d = marker.dim
    images, labels, keys = load_probe_split(args.test, args.per_class)
    n = images.shape[0]
    log(f"probe {n} images ({args.per_class}/class), d = {d}, {args.keys} keys")

    timings["setup_s"] = time.perf_counter() - t_start
    # --- marked probes (the main cost), cached
    t0 = time.perf_counter()
    marked = []
    for i, (rec, key) in enumerate(recs):
        z = mark_probe(
            work
            / (
                f"marked_k{i}_n{n}.npz"
                if args.preset == "default"
                else f"marked_{args.preset}_k{i}_n{n}.npz"
            ),
            images,
            labels,
            carriers(rec, key).astype(np.float32),
            marker,
            i,
            args.steps,
            preset=args.preset,
        )
        marked.append(z)
        log(f"key {i}: PSNR mean {z['psnr'].mean():.2f} dB, feature cos {z['cos'].mean():.3f}")

    timings["marking_s (this run; cached keys cost 0)"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    # --- probes of every condition
    def names(k: int) -> list[str]:
        return [f"b{k}", f"d{k}", *(f"{c}{q}_{k}" for c in ("c", "dc") for q in JPEG_QUALITIES)]

    probes: dict[str, np.ndarray] = {"a": images}
    for q in JPEG_QUALITIES:
        probes[f"a{q}"] = jpeg(images, q)
    for i, (_rec, key) in enumerate(recs):
        m = marked[i]["images"]
        probes[f"b{i}"] = m
        for q in JPEG_QUALITIES:
            probes[f"c{q}_{i}"] = jpeg(m, q)
        from radmark.marking.selection import is_selected

        seed = key.selection_seed()
        sel = np.array([is_selected(seed, k.rsplit("/", 1)[1], 0.1) for k in keys])
        mix = images.copy()
        mix[sel] = m[sel]
        probes[f"d{i}"] = mix
        for q in JPEG_QUALITIES:
            probes[f"dc{q}_{i}"] = jpeg(mix, q)
        marked[i]["sel_fraction"] = float(sel.mean())
    jpeg_psnr = {}
    for q in JPEG_QUALITIES:
        mse = ((probes[f"a{q}"].astype(float) - images) ** 2).mean()
        jpeg_psnr[q] = float(10 * math.log10(255**2 / mse))

    # --- the guard (radmark/verify/guard.py) on each probe: the keyed pixel digests a marking run
    # of key k records for its marked images; which probes would verify refuse?
    from radmark.errors import InputError
    from radmark.keys.keypair import pixel_digest
    from radmark.data.arrays import Probe
    from radmark.verify.guard import check_probe_pixels

    guard: dict[str, Any] = {}
    for i, (rec, key) in enumerate(recs):
        seed = key.selection_seed()
        digests = {pixel_digest(seed, marked[i]["images"][j]) for j in range(n)}

        for nm in ("a", *(f"a{q}" for q in JPEG_QUALITIES), *names(i)):
            try:
                check_probe_pixels(Probe(probes[nm], labels, keys, nm), key, digests, rec.short)
                guard[f"{nm}|key{i}"] = "accepted"
            except InputError:
                guard[f"{nm}|key{i}"] = "refused"
    log(f"guard: {guard}")
    timings["probes_jpeg_guard_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    # --- score: every probe with every experiment key (controls: j != k)
    scores: dict[str, dict[str, Any]] = {}
    for name, im in probes.items():
        scores[name] = score(im, labels, keys, suspect, store, recs, name)
        log(
            f"scored {name}: log10 p {np.round(scores[name]['log10p'], 2).tolist()}, "
            f"R² {scores[name]['r2']:.3f}"
        )

    timings["scoring_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from radmark.keys.carriers import derive_carriers

    u_ctrl = np.stack(
        [
            derive_carriers(
                experiment_key(20_000 + j).carrier_seed(), d, C, marker.identity
            ).astype(np.float64)
            for j in range(args.control_keys)
        ]
    )
    kk = args.keys
    base_of = BASE_OF
    # every per-class cosine [K, C] (standard, and cross-fit below), for re-analysis
    per_class: dict[str, np.ndarray] = {f"cos_{nm}": sc["cos"] for nm, sc in scores.items()}
    conds: dict[str, dict[str, Any]] = {}
    for cond in CONDS:
        own, ctrl, own_vs_a, dts, dts_ctrl = [], [], [], [], []
        lp_own, lp_base, lp_ctrl_shift = [], [], []
        for i in range(kk):
            nm = f"{cond}{i}" if cond in ("b", "d") else f"{cond}_{i}"
            sc = scores[nm]
            base = scores[base_of[cond]]
            own.append(sc["cos"][i] - base["cos"][i])
            own_vs_a.append(sc["cos"][i] - scores["a"]["cos"][i])
            dts.append(fisher_stat(sc["cos"][i], d) - fisher_stat(base["cos"][i], d))
            lp_own.append(sc["log10p"][i])
            lp_base.append(base["log10p"][i])
            for j in range(kk):
                if j != i:
                    ctrl.append(sc["cos"][j] - base["cos"][j])
                    dts_ctrl.append(fisher_stat(sc["cos"][j], d) - fisher_stat(base["cos"][j], d))
                    lp_ctrl_shift.append(sc["log10p"][j] - base["log10p"][j])
            for u in u_ctrl:  # unrelated keys that marked nothing
                cs, cb = (sc["rows"] * u).sum(1), (base["rows"] * u).sum(1)
                ctrl.append(cs - cb)
                dts_ctrl.append(fisher_stat(cs, d) - fisher_stat(cb, d))
                lp_ctrl_shift.append(fisher_log10(cs, d) - fisher_log10(cb, d))
        own_a, ctrl_a = np.stack(own), np.stack(ctrl)
        s = summarise(own_a, d)
        conds[cond] = {
            "baseline": base_of[cond],
            **s,
            "bias_vs_clean_lossless": summarise(np.stack(own_vs_a), d),
            "log10p": lp_own,
            "log10p_baseline": lp_base,
            "log10p_shift": [a - b for a, b in zip(lp_own, lp_base)],
            "fisher_stat_shift": dts,
            "control_unrelated_key": {
                **summarise(ctrl_a, d),
                "pairs": len(ctrl),
                "log10p_shift_mean": float(np.mean(lp_ctrl_shift)),
                "log10p_shift_se": float(np.std(lp_ctrl_shift, ddof=1) / math.sqrt(len(ctrl))),
                "fisher_stat_shift_mean": float(np.mean(dts_ctrl)),
                "log10p_shift": lp_ctrl_shift,
            },
            "log10p_shift_mean": float(np.mean(np.subtract(lp_own, lp_base))),
            "fisher_stat_shift_mean": float(np.mean(dts)),
            "p_below_1e-3_normal_b": p_below_normal(s["bias_sd"], d),
            "p_below_1e-3_normal_b_plus_2se": p_below_normal(s["bias_sd"] + 2 * s["bias_sd_se"], d),
            "p_below_1e-3_sim_b": p_below(s["bias_sd"], d, reps=args.reps),
            "p_below_1e-3_sim_b_plus_2se": p_below(
                s["bias_sd"] + 2 * s["bias_sd_se"], d, reps=args.reps
            ),
            "p_below_1e-3_from_mean_dT": p_below_from_dt(float(np.mean(dts))),
        }
        log(
            f"{cond}: bias {s['bias_sd']:+.4f} ± {s['bias_sd_se']:.4f} sd, log10 p shift "
            f"{np.round(conds[cond]['log10p_shift'], 3).tolist()}, "
            f"P(p<1e-3) {conds[cond]['p_below_1e-3_sim_b']:.2e}"
        )

    result: dict[str, Any] = {
        "kind": "probe-bias",
        "issue": "#17 item 1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {platform.machine()} / {os.cpu_count()} cpus, shared with other jobs",
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "commit": git_commit(),
        "command": " ".join(["python -m bench.experiments.probe_bias", *sys.argv[1:]]),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "models": models,
        "classes": C,
        "d": d,
        "null_sd_cos": 1 / math.sqrt(d),
        "probe_images": n,
        "per_class": args.per_class,
        "keys": kk,
        "preset": args.preset if args.steps is None else f"{args.preset}, steps={args.steps}",
        "marked_psnr_mean": [float(z["psnr"].mean()) for z in marked],
        "marked_feature_cos_mean": [float(z["cos"].mean()) for z in marked],
        "d_selected_fraction": [float(z["sel_fraction"]) for z in marked],
        "jpeg_psnr_clean_db": jpeg_psnr,
        "alignment_r2": {k: v["r2"] for k, v in scores.items()},
        "log10p_clean": scores["a"]["log10p"].tolist(),
        "log10p_clean_jpeg": {q: scores[f"a{q}"]["log10p"].tolist() for q in JPEG_QUALITIES},
        "guard_pixel_digests": guard,
        "control_keys": args.control_keys,
        "conditions": conds,
        "p_below_1e-3_sim_b0_check": p_below(0.0, d, reps=args.reps),
        "p_below_1e-3_by_bias_sd_normal": {
            str(b): p_below_normal(b, d) for b in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.13)
        },
        "reps": args.reps,
    }

    # --- cross-fit prototype
    if args.crossfit:
        cf: dict[str, Any] = {}
        a = scores["a"]
        lib_rows = full_rows(a["fm"], a["fs"], a["w"])
        cf["normal_eq_vs_library_max_abs_cos_diff"] = float(
            max(
                np.abs((lib_rows * carriers(r, k)).sum(1) - a["cos"][i]).max()
                for i, (r, k) in enumerate(recs)
            )
        )
        rows = {nm: crossfit_rows(sc["fm"], sc["fs"], sc["w"], labels) for nm, sc in scores.items()}
        cfcos = {nm: np.stack([(rows[nm] * carriers(r, k)).sum(1) for r, k in recs]) for nm in rows}
        per_class.update({f"crossfit_cos_{nm}": v for nm, v in cfcos.items()})
        cf["clean_log10p"] = [fisher_log10(c, d) for c in cfcos["a"]]
        row_cos = (rows["a"] * a["rows"]).sum(1)
        cf["clean_rows_crossfit_vs_standard_cos"] = {
            "mean": float(row_cos.mean()),
            "min": float(row_cos.min()),
        }
        cf["clean_cos_vs_standard_corr"] = float(
            np.corrcoef(cfcos["a"].ravel(), a["cos"].ravel())[0, 1]
        )
        for cond in CONDS:
            own, ctrl, lp, lpb = [], [], [], []
            for i in range(kk):
                nm = f"{cond}{i}" if cond in ("b", "d") else f"{cond}_{i}"
                base = base_of[cond]
                own.append(cfcos[nm][i] - cfcos[base][i])
                lp.append(fisher_log10(cfcos[nm][i], d))
                lpb.append(fisher_log10(cfcos[base][i], d))
                ctrl.extend(cfcos[nm][j] - cfcos[base][j] for j in range(kk) if j != i)
                ctrl.extend(((rows[nm] - rows[base]) * u).sum(1) for u in u_ctrl)
            s = summarise(np.stack(own), d)
            cf[cond] = {
                **s,
                "log10p": lp,
                "log10p_baseline": lpb,
                "log10p_shift": [x - y for x, y in zip(lp, lpb)],
                "log10p_shift_mean": float(np.mean(np.subtract(lp, lpb))),
                "p_below_1e-3_normal_b": p_below_normal(s["bias_sd"], d),
                "p_below_1e-3_normal_b_plus_2se": p_below_normal(
                    s["bias_sd"] + 2 * s["bias_sd_se"], d
                ),
                "control_unrelated_key": summarise(np.stack(ctrl), d),
            }
            # The paired estimate of the STANDARD test's bias: its shift minus the cross-fit's.
            # The cross-fit row of class c never sees class c's (marked) images, so its shift has
            # mean exactly 0 and E[standard shift] = E[standard shift − cross-fit shift]; the
            # difference keeps only what class c's own probe images do to row c, so the noise from
            # every other image's marks cancels (a control-variate estimate, far smaller SE).
            paired, pctrl = [], []
            for i in range(kk):
                nm = f"{cond}{i}" if cond in ("b", "d") else f"{cond}_{i}"
                base = base_of[cond]
                sd_nm = scores[nm]["cos"][i] - cfcos[nm][i]
                sd_base = scores[base]["cos"][i] - cfcos[base][i]
                paired.append(sd_nm - sd_base)
                dd = (scores[nm]["rows"] - rows[nm]) - (scores[base]["rows"] - rows[base])
                pctrl.extend((dd * u).sum(1) for u in u_ctrl)
            sp = summarise(np.stack(paired), d)
            cf[cond]["paired_standard_bias"] = {
                **sp,
                "p_below_1e-3_normal_b": p_below_normal(sp["bias_sd"], d),
                "p_below_1e-3_normal_b_plus_2se": p_below_normal(
                    sp["bias_sd"] + 2 * sp["bias_sd_se"], d
                ),
                "control_unrelated_key": summarise(np.stack(pctrl), d),
            }
            per_class[f"paired_{cond}"] = np.stack(paired)
            log(
                f"crossfit {cond}: bias {s['bias_sd']:+.4f} ± {s['bias_sd_se']:.4f} sd; paired "
                f"standard bias {sp['bias_sd']:+.5f} ± {sp['bias_sd_se']:.5f} sd (control "
                f"{cf[cond]['paired_standard_bias']['control_unrelated_key']['bias_sd']:+.5f})"
            )
        # calibration on the clean probe: per-class p over classes × many keys (scored only)
        from scipy import stats

        from radmark.keys.carriers import derive_carriers

        pcf, pstd, fisher_cf, fisher_std = [], [], [], []
        for j in range(args.null_keys):
            kj = experiment_key(10_000 + j)
            u = derive_carriers(kj.carrier_seed(), d, C, marker.identity).astype(np.float64)
            c_cf, c_std = (rows["a"] * u).sum(1), (lib_rows * u).sum(1)
            pcf.append(np.exp(log_cosine_sf(c_cf, d)))
            pstd.append(np.exp(log_cosine_sf(c_std, d)))
            fisher_cf.append(fisher_log10(c_cf, d))
            fisher_std.append(fisher_log10(c_std, d))
        pcf_a, pstd_a = np.concatenate(pcf), np.concatenate(pstd)
        cf["calibration_clean"] = {
            "null_keys": args.null_keys,
            "per_class_ks_crossfit": [float(v) for v in stats.kstest(pcf_a, "uniform")],
            "per_class_ks_standard": [float(v) for v in stats.kstest(pstd_a, "uniform")],
            "fisher_p_ks_crossfit": [
                float(v) for v in stats.kstest(10 ** np.asarray(fisher_cf), "uniform")
            ],
            "fisher_p_ks_standard": [
                float(v) for v in stats.kstest(10 ** np.asarray(fisher_std), "uniform")
            ],
            "per_class_frac_p_below_0.01": [
                float((pcf_a < 0.01).mean()),
                float((pstd_a < 0.01).mean()),
            ],
        }
        # the key's own per-class p on its own marked probe, pooled over classes × keys: uniform
        # when the alignment is immune (the measured version of "the null stays exact")
        own_ks = {}
        for cond in CONDS:
            for label, cs in (
                ("standard", lambda nm, i: scores[nm]["cos"][i]),
                ("crossfit", lambda nm, i: cfcos[nm][i]),
            ):
                pv = np.concatenate(
                    [
                        np.exp(
                            log_cosine_sf(
                                cs(f"{cond}{i}" if cond in ("b", "d") else f"{cond}_{i}", i), d
                            )
                        )
                        for i in range(kk)
                    ]
                )
                own_ks[f"{cond}_{label}"] = [float(v) for v in stats.kstest(pv, "uniform")]
        cf["calibration_own_marked_probe_ks"] = own_ks
        log(f"crossfit calibration: {cf['calibration_clean']}; own marked probe KS {own_ks}")
        if args.marked_suspect and args.marked_keystore:
            cf["marked_suspect"] = marked_suspect_power(args, paths, images, labels, keys)
        result["crossfit"] = cf

    np.savez_compressed(args.out.with_suffix(".per_class.npz"), **per_class)
    timings["analysis_s"] = time.perf_counter() - t0
    result["timings"] = timings
    result["wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out} ({result['wall_s']:.0f} s)")


def marked_suspect_power(
    args: Any, paths: dict[str, Path], images: np.ndarray, labels: np.ndarray, keys: list[str]
) -> dict[str, Any]:
    """Power cost of cross-fitting: the standard and cross-fit log10 p of a marked suspect."""
    from radmark.data.arrays import Probe
    from radmark.keys.store import Keystore
    from radmark.models import load_model
    from radmark.verify.evidence import Evidence, EvidenceSettings
    from radmark.verify.run import select_records
    from radmark.verify.statistics import to_log10
    from radmark.verify.white_box import WhiteBoxTest

    store = Keystore.open(args.marked_keystore)
    ref = str(args.marked_keyfile) if args.marked_keyfile else None
    out: dict[str, Any] = {"suspect": str(args.marked_suspect)}
    sus = load_model(str(paths["marked_suspect"]))
    ev = Evidence(
        suspect=sus,
        store=store,
        probe=Probe(images, labels, keys, source="clean"),
        settings=EvidenceSettings(batch_size=256, marker_spec=str(paths["marker"])),
    )
    for rec, key in select_records(store, ref, lambda: None):
        res = WhiteBoxTest().run(ev, rec, key)
        u = carriers(rec, key)
        rows = crossfit_rows(
            ev.marker_features(rec), ev.suspect_features(), ev.suspect_weight(), labels
        )
        out[rec.short] = {
            "fraction": rec.fraction,
            "standard_log10p": float(to_log10(res.log_p)),
            "crossfit_log10p": fisher_log10((rows * u).sum(1), rec.dim),
            "standard_mean_cos_sd": float(np.mean(res.units) * math.sqrt(rec.dim)),
            "crossfit_mean_cos_sd": float(np.mean((rows * u).sum(1)) * math.sqrt(rec.dim)),
        }
        log(f"marked suspect {rec.short}: {out[rec.short]}")
    return out


if __name__ == "__main__":
    main()
