"""Rich rendering of every command's result for people (the CLI's only import of rich tables).

Reports go to stdout, logs and progress to stderr. When stdout is not a terminal (CI logs, pipes)
nothing is cut: fingerprints, hashes and paths must stay copyable, so tables fold instead of
truncating and the console is wide.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table

from radmark.data.samples import printable

if TYPE_CHECKING:
    from radmark.keys.manage import (
        ImportResult,
        KeygenResult,
        KeyListing,
        PublicExport,
        ShownObject,
    )
    from radmark.marking.kit import KitBuildResult
    from radmark.marking.run import MarkResult
    from radmark.marking.run import Progress as MarkProgress
    from radmark.models.training import TrainResult
    from radmark.verify.run import VerifyResult


#: The console width off a terminal: wider than any path (PATH_MAX is 4096) with its row label,
#: so that a value is never folded or cut in a log. Renderables are only as wide as their content
#: (no table or panel here expands), so lines are not padded to this width.
PIPED_WIDTH = 8192


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal, rich would wrap at 80 columns: use a width that never cuts or folds a value.
    width = None if stream.isatty() else PIPED_WIDTH
    return Console(file=stream, highlight=False, width=width, soft_wrap=not stream.isatty())


def _grid() -> Table:
    """A label/value grid whose values fold on a narrow terminal instead of ending in "…"."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


def out() -> Console:
    return _console(stderr=False)


def err() -> Console:
    return _console(stderr=True)


def progress(label: str, *, enabled: bool = True) -> Progress:
    """A transient progress bar on stderr, shown only on a terminal (never in logs or pipes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    e = err()
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=e,
        transient=True,
        disable=not (enabled and e.is_terminal),
    )


def marking_status(p: MarkProgress, seconds: float) -> str:
    """The marking bar's text: images, marked, rate and mean PSNR so far."""
    rate = p.images_done / max(seconds, 1e-9)
    psnr = f"{p.psnr_mean:.1f} dB" if p.psnr_mean is not None else "-"
    return f"{p.images_done} images, {p.marked_done} marked, {rate:.1f} img/s, PSNR {psnr}"


def keygen(res: KeygenResult) -> None:
    e = err()
    e.print(f"[bold]new key[/bold] {res.fingerprint}")
    how = "passphrase-encrypted" if res.encrypted else "unencrypted, mode 0600"
    e.print(f"secret: {res.path} ({how})")
    if res.key_file:
        e.print(f"key file: {res.key_file}")


def key_imported(res: ImportResult) -> None:
    what = "already in" if res.already_present else "imported into"
    err().print(f"key {res.fingerprint} {what} keystore {res.keystore}")


def keys_list(res: KeyListing) -> None:
    entries = res.entries
    table = Table(title=f"keystore {res.keystore}")
    table.add_column("kind")
    table.add_column("address", overflow="fold")
    table.add_column("created")
    table.add_column("details", overflow="fold")
    for e in entries:
        details = ", ".join(
            f"{k}={v}" for k, v in e.summary.items() if k != "created" and v is not None
        )
        table.add_row(e.kind, f"sha256:{e.address}", str(e.summary.get("created", "")), details)
    out().print(table)


def keys_show(shown: ShownObject) -> None:
    o = out()
    o.print(f"[bold]{shown.kind}[/bold] {shown.address}")
    if shown.kind == "key":
        o.print(f"secret in keystore: {'yes' if shown.has_secret else 'no'}")
    o.print_json(json.dumps(shown.record))


def public_export(res: PublicExport) -> None:
    """The canonical bytes on stdout (what is published), or where they were written."""
    if res.path is not None:
        err().print(f"wrote {res.path}")
    else:
        sys.stdout.write(res.data.decode("utf-8") + "\n")


def kit(res: KitBuildResult) -> None:
    err().print(
        f"kit {res.kit_record}: {res.images} images × {res.decoys + 1} carriers "
        f"({res.markings} markings, PSNR mean {res.psnr_mean:.1f} dB) in {res.seconds:.1f} s, "
        f"{res.kit_bytes} bytes"
    )


def mark(res: MarkResult) -> None:
    table = Table(title=f"marked with key {res.fingerprint}")
    for col in ("shard", "samples", "marked", "skipped", "PSNR mean", "PSNR min", "L∞ max", ""):
        table.add_column(col, overflow="fold")
    for r in res.shards:
        table.add_row(
            printable(r.name),
            str(r.samples),
            str(r.marked),
            str(r.skipped),
            f"{r.psnr_mean:.2f}" if r.psnr_mean is not None else "-",
            f"{r.psnr_min:.2f}" if r.psnr_min is not None else "-",
            str(r.linf_max),
            "resumed" if r.resumed else "",
        )
    e = err()
    e.print(table)
    e.print(
        f"{res.marked}/{res.images} images marked ({res.skipped} skipped), "
        f"{res.images_per_s:.1f} images/s, method {res.method}, marker {res.marker}"
    )
    if res.unchanged:
        e.print(
            f"[yellow]{res.unchanged} selected images could not be marked (the method left them "
            "unchanged; they were copied as they were): is the marker trained?[/yellow]"
        )
    kept = [(r.reencoded, r.lossy_mark_kept) for r in res.shards if r.lossy_mark_kept is not None]
    if kept:
        n = sum(k for k, _ in kept)
        frac = sum(k * v for k, v in kept) / n
        e.print(f"{n} marked images re-encoded lossily (JPEG/WebP) keep {frac:.0%} of the mark")
    e.print(f"mark record: {res.record}")
    if res.kit is not None:
        kit(res.kit)


def marker_epoch(epoch: int, epochs: int, accuracy: float) -> str:
    """The training bar's text after an epoch (the bar shows on a terminal only)."""
    return f"epoch {epoch}/{epochs}, train accuracy {accuracy:.3f}"


def marker_trained(res: TrainResult) -> None:
    err().print(
        f"marker {res.arch} ({res.num_classes} classes, {res.images} images, train accuracy "
        f"{res.train_accuracy:.3f}) -> {res.path}"
    )


_SPARK = "▁▂▃▄▅▆▇█"


def _spark(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 8))] for v in values)


def _tested(res: VerifyResult) -> str:
    """What Holm corrected over: every (model, key) pair."""
    n_models = max(1, len(res.models))
    n_keys = len(res.results) // n_models
    if n_models > 1:
        return f"{len(res.results)} tests: {n_models} models × {n_keys} keys"
    return f"{n_keys} keys tested"


def verify(res: VerifyResult) -> None:
    o = out()
    verdict = (
        "[bold red]MARK DETECTED[/bold red]"
        if res.detected
        else "[bold green]no mark detected[/bold green]"
    )
    if not res.preregistered:  # the verdict holds for this run only: say so where it is read
        verdict += " [bold yellow](exploratory: not pre-registered)[/bold yellow]"
    head = _grid()
    for m in res.models or []:
        head.add_row("model", f"{m.model} ({m.arch})")
        head.add_row("model sha256", m.sha256)
    head.add_row("probe images", str(res.probe_size))
    head.add_row("alpha", f"{res.alpha:g}" + (f" ({res.correction})" if res.correction else ""))
    head.add_row("verdict", verdict)
    o.print(Panel(head, title="radmark verify", expand=False))
    for r in res.results:
        title = f"key {r.fingerprint}" + (f", model {r.model}" if len(res.models) > 1 else "")
        t = Table(title=title, title_justify="left")
        t.add_column("test")
        t.add_column("log10 p", justify="right")
        t.add_column("exact")
        t.add_column("what", overflow="fold")
        for name, tr in r.tests.items():
            extra = "".join(f"; {k.replace('_', ' ')} {v:.4g}" for k, v in tr.extra.items())
            t.add_row(name, f"{tr.log10_p:.2f}", "yes" if tr.exact else "approx.",
                      tr.description + extra)  # fmt: skip
        t.add_row(
            "[bold]combined (verdict)[/bold]", f"[bold]{r.log10_p:.2f}[/bold]", "yes", r.combination
        )
        if res.correction:
            t.add_row("after Holm", f"{r.log10_p_adjusted:.2f}", "yes", _tested(res))
        o.print(t)
        info = _grid()
        info.add_row("plan", r.plan.label)
        info.add_row("mark record", r.record)
        info.add_row("method", r.method)
        info.add_row("marker", r.marker)
        info.add_row("classes / dim", f"{r.num_classes} / {r.dim}")
        cos = r.cosines
        if r.alignment_r2 is not None:
            info.add_row(
                "alignment",
                f"R² = {r.alignment_r2:.3f}, relative residual {r.alignment_residual:.3f}",
            )
        if cos:
            info.add_row(
                "cosines",
                f"{_spark(cos)}  mean {np.mean(cos):+.4f}, max {max(cos):+.4f} "
                f"(null sd {1 / np.sqrt(r.dim):.4f})",
            )
            if r.num_classes <= 20:
                info.add_row("per class", " ".join(f"{c:+.3f}" for c in cos))
                info.add_row("log10 p", " ".join(f"{p:.1f}" for p in r.class_log10_p))
        if r.black_box_ranks is not None and r.num_classes <= 50:
            info.add_row(
                "black-box ranks",
                " ".join(str(k) for k in r.black_box_ranks)
                + f"  (of {r.black_box_slots} carriers; 1 = true carrier first)",
            )
        info.add_row("detected", "[bold red]yes[/bold red]" if r.detected else "no")
        o.print(info)
    e = err()
    for w in res.warnings:
        e.print(f"[yellow]warning:[/yellow] {w}")
