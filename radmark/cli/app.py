"""The command line: parse, call one library function, render its result.

Errors the user can cause are :class:`~radmark.errors.RadmarkError`; they are caught in one
place, :func:`_guard` (every command is registered through :func:`_command`), printed as one
line on stderr and turned into exit code 2. Typer's
pretty tracebacks are configured without locals so a secret can never leak into a CI log.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from radmark import SCHEMA_VERSION, __version__
from radmark.errors import RadmarkError, UsageError


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The single place where user errors become one line on stderr + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RadmarkError as exc:
            typer.echo(f"radmark: error: {exc.diagnostics()}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _command(parent: typer.Typer, name: str | None = None) -> Callable[..., Any]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        parent.command(name)(_guard(fn))
        return fn

    return register


def _typer(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=False,
        rich_markup_mode=None,
    )


app = _typer(
    "radmark: mark image datasets radioactively and test models for the mark, with exact p-values."
)
keys_app = _typer("List, show and export keys and mark records in the keystore.")
app.add_typer(keys_app, name="keys")
marker_app = _typer("Marking networks: train one on your own shards.")
app.add_typer(marker_app, name="marker")
kit_app = _typer("Verification kits: decoy-marked probe images for the exact black-box test.")
app.add_typer(kit_app, name="kit")

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

KeystoreOpt = Annotated[
    Path,
    typer.Option(
        "--keystore", envvar="RADMARK_KEYSTORE", help="Keystore directory.", show_default=True
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"schema_version": SCHEMA_VERSION, **obj}, indent=2) + "\n")
    sys.stdout.flush()


def passphrase_from_env_or_prompt(confirm: bool = False) -> str | None:
    """RADMARK_PASSPHRASE if set, else a hidden prompt when a terminal is attached, else None."""
    env = os.environ.get("RADMARK_PASSPHRASE")
    if env is not None:
        return env
    if sys.stdin is not None and sys.stdin.isatty():
        return (
            typer.prompt(
                "Passphrase",
                hide_input=True,
                confirmation_prompt=confirm,
                default="",
                show_default=False,
            )
            or None
        )
    return None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"radmark {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """radmark: mark image datasets radioactively and test models for the mark."""


@_command(app)
def keygen(
    keystore: KeystoreOpt = Path("keys"),
    passphrase: Annotated[
        bool | None,
        typer.Option(
            "--passphrase/--no-passphrase",
            help="Encrypt the secret with a passphrase (RADMARK_PASSPHRASE or a prompt). "
            "Default: encrypt when RADMARK_PASSPHRASE is set or a terminal can prompt.",
        ),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Also write a portable owner key file (secret included, 0600)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a new signed secret key in the keystore and print its fingerprint."""
    from radmark.keys.manage import generate_key

    if passphrase is False:
        pw = None
    else:
        pw = passphrase_from_env_or_prompt(confirm=True)
        if passphrase and not pw:
            raise UsageError("--passphrase needs RADMARK_PASSPHRASE or an interactive terminal")
    result = generate_key(keystore, passphrase=pw, out_file=out_file)
    if json_out:
        _emit_json(
            {
                "fingerprint": result.fingerprint,
                "path": str(result.path),
                "keystore": str(result.keystore),
                "encrypted": result.encrypted,
                "key_file": str(result.key_file) if result.key_file else None,
            }
        )
        return
    err.print(f"[bold]new key[/bold] {result.fingerprint}")
    err.print(
        f"secret: {result.path} ({'passphrase-encrypted' if result.encrypted else 'unencrypted, mode 0600'})"
    )
    if result.key_file:
        err.print(f"key file: {result.key_file}")
    typer.echo(result.fingerprint)


@_command(keys_app, "list")
def keys_list(keystore: KeystoreOpt = Path("keys"), json_out: JsonOpt = False) -> None:
    """List keys and mark records (every object is re-hashed and its signature checked)."""
    from radmark.keys.manage import list_entries

    entries = list_entries(keystore)
    if json_out:
        _emit_json(
            {
                "entries": [
                    {"kind": e.kind, "address": f"sha256:{e.address}", **e.summary} for e in entries
                ]
            }
        )
        return
    table = Table(title=f"keystore {keystore}")
    table.add_column("kind")
    table.add_column("address", overflow="fold")
    table.add_column("created")
    table.add_column("details")
    for e in entries:
        details = ", ".join(
            f"{k}={v}" for k, v in e.summary.items() if k != "created" and v is not None
        )
        table.add_row(e.kind, f"sha256:{e.address}", str(e.summary.get("created", "")), details)
    out.print(table)


@_command(keys_app, "show")
def keys_show(
    ref: Annotated[str, typer.Argument(help="Fingerprint, address or a unique prefix of one.")],
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Show a key's public record or a mark record (verified)."""
    from radmark.keys.manage import show_object

    shown = show_object(keystore, ref)
    if json_out:
        _emit_json(
            {
                "address": shown.address,
                "kind": shown.kind,
                "record": shown.record,
                "has_secret": shown.has_secret,
            }
        )
        return
    out.print(f"[bold]{shown.kind}[/bold] {shown.address}")
    if shown.kind == "key":
        out.print(f"secret in keystore: {'yes' if shown.has_secret else 'no'}")
    out.print_json(json.dumps(shown.record))


@_command(keys_app, "export-public")
def keys_export_public(
    ref: Annotated[str, typer.Argument(help="Fingerprint, address or a unique prefix of one.")],
    keystore: KeystoreOpt = Path("keys"),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to FILE instead of stdout.")
    ] = None,
) -> None:
    """Print what can be published: the signed public record (never the secret)."""
    from radmark.keys.manage import export_public

    data = export_public(keystore, ref)
    if out_file is not None:
        from radmark.fsutil import atomic_write_bytes

        atomic_write_bytes(out_file, data + b"\n")
        err.print(f"wrote {out_file}")
    else:
        sys.stdout.write(data.decode("utf-8") + "\n")


def _passphrase_fn() -> Callable[[], str | None]:
    return lambda: passphrase_from_env_or_prompt(confirm=False)


@_command(app)
def mark(
    shards: Annotated[
        list[str],
        typer.Argument(
            help="Shard files, directories, brace patterns (data-{000000..000009}.tar) or pipe: URLs."
        ),
    ],
    key: Annotated[
        str,
        typer.Option(
            "--key", help="Owner key file, or a key fingerprint (prefix) in the keystore."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Output directory: one output shard per input shard, same names."
        ),
    ],
    fraction: Annotated[
        float, typer.Option("--fraction", "-q", help="Fraction of samples to mark, in (0, 1].")
    ] = 0.1,
    marker: Annotated[
        str, typer.Option("--marker", help="Marking network: FILE.safetensors or torchvision:NAME.")
    ] = "torchvision:resnet18",
    marker_arch: Annotated[
        str | None,
        typer.Option("--marker-arch", help="Architecture of a marker file without metadata."),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="Marking parameters: 'default' (L-inf 2: PSNR >= 42 dB), 'psnr42' (per-image "
            "PSNR >= 42 dB budget, L-inf 8) or 'paper'.",
        ),
    ] = "default",
    steps: Annotated[
        int | None, typer.Option("--steps", help="Override the preset's optimisation steps.")
    ] = None,
    radius: Annotated[
        float | None,
        typer.Option("--radius", help="Override the preset's L-infinity radius, in pixel levels."),
    ] = None,
    psnr_floor: Annotated[
        float | None,
        typer.Option("--psnr-floor", help="Per-image PSNR budget in dB (an L2 bound on the mark)."),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="Classes in the dataset (default: the marker's)."),
    ] = None,
    label_field: Annotated[
        str, typer.Option("--label-field", help="Member holding the integer label.")
    ] = "cls",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images marked together.")] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run into the same --out.")
    ] = False,
    on_error: Annotated[
        str,
        typer.Option(
            "--on-error",
            help="fail: stop at the first bad sample; skip: copy it unmarked and count it.",
        ),
    ] = "fail",
    kit_probe: Annotated[
        list[str] | None,
        typer.Option(
            "--kit-probe",
            help="Also build the black-box verification kit from these clean held-out shards "
            "(as `radmark kit build`), repeatable.",
        ),
    ] = None,
    kit_decoys: Annotated[int, typer.Option("--kit-decoys", help="Kit decoys per class.")] = 39,
    kit_per_class: Annotated[
        int, typer.Option("--kit-per-class", help="Kit images per class.")
    ] = 10,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Mark a fraction of the images in WebDataset shards, shard by shard, and record the mark."""
    from radmark.keys.manage import load_secret_key
    from radmark.marking.run import MarkOptions, mark_shards

    if kit_probe:  # checked before hours of marking, not after
        from radmark.data.shards import expand_shards

        if kit_decoys < 1 or kit_per_class < 1:
            raise UsageError("--kit-decoys and --kit-per-class must be at least 1")
        expand_shards(kit_probe)

    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if radius is not None:
        overrides["radius"] = radius
    if psnr_floor is not None:
        overrides["psnr_floor"] = psnr_floor
    secret, record = load_secret_key(keystore, key, _passphrase_fn())
    options = MarkOptions(
        fraction=fraction,
        preset=preset,
        overrides=overrides,
        num_classes=num_classes,
        label_field=label_field,
        batch_size=batch_size,
        device=device,
        resume=resume,
        on_error=on_error,
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun only rank 0 reports

    with Progress(
        TextColumn("[bold]marking"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=json_out or rank != 0,
    ) as bar:
        task = bar.add_task("shards", total=None, info="")
        t0 = __import__("time").perf_counter()

        def on_progress(p: Any) -> None:
            rate = p.images_done / max(__import__("time").perf_counter() - t0, 1e-9)
            psnr = f"{p.psnr_mean:.1f} dB" if p.psnr_mean is not None else "-"
            bar.update(
                task,
                total=p.shards_total,
                completed=p.shards_done,
                info=f"{p.images_done} images, {p.marked_done} marked, {rate:.1f} img/s, PSNR {psnr}",
            )

        result = mark_shards(
            shards,
            key=secret,
            key_record=record,
            keystore=keystore,
            out_dir=out_dir,
            marker_spec=marker,
            marker_arch=marker_arch,
            options=options,
            progress=on_progress,
        )
    if rank != 0:
        return
    kit = None
    if kit_probe:
        from radmark.keys.store import Keystore
        from radmark.marking.kit import build_kit

        store = Keystore.open(keystore)
        kit = build_kit(
            store=store,
            record=store.mark_record(result.record),
            key=secret,
            probe=kit_probe,
            marker_spec=marker,
            decoys=kit_decoys,
            per_class=kit_per_class,
            device=device,
        )
    if json_out:
        _emit_json(
            {
                "kit": _kit_json(kit) if kit is not None else None,
                "fingerprint": result.fingerprint,
                "record": result.record,
                "shards": len(result.shards),
                "images": result.images,
                "marked": result.marked,
                "skipped": result.skipped,
                "psnr_mean": result.psnr_mean,
                "psnr_min": result.psnr_min,
                "linf_max": result.linf_max,
                "feature_cos_mean": _weighted_cos(result.shards),
                "images_per_s": result.images_per_s,
                "seconds": result.seconds,
                "marker": result.marker,
                "preset": result.preset,
                "out": str(result.out_dir),
                "shard_reports": [
                    {
                        "name": r.name,
                        "samples": r.samples,
                        "marked": r.marked,
                        "skipped": r.skipped,
                        "output_sha256": r.output_sha256,
                        "resumed": r.resumed,
                        "feature_cos_mean": r.feature_cos_mean,
                    }
                    for r in result.shards
                ],
            }
        )
        return
    table = Table(title=f"marked with key {result.fingerprint}")
    for col in ("shard", "samples", "marked", "skipped", "PSNR mean", "PSNR min", "L∞ max", ""):
        table.add_column(col)
    for r in result.shards:
        table.add_row(
            r.name,
            str(r.samples),
            str(r.marked),
            str(r.skipped),
            f"{r.psnr_mean:.2f}" if r.psnr_mean is not None else "-",
            f"{r.psnr_min:.2f}" if r.psnr_min is not None else "-",
            str(r.linf_max),
            "resumed" if r.resumed else "",
        )
    err.print(table)
    err.print(
        f"{result.marked}/{result.images} images marked ({result.skipped} skipped), "
        f"{result.images_per_s:.1f} images/s, marker {result.marker}"
    )
    err.print(f"mark record: {result.record}")
    if kit is not None:
        _print_kit(kit)
    typer.echo(result.record)


def _weighted_cos(shards: list[Any]) -> float | None:
    """Mean cosine of the marker's feature shift with the carrier over all marked images."""
    pairs = [(r.marked, r.feature_cos_mean) for r in shards if r.feature_cos_mean is not None]
    n = sum(m for m, _ in pairs)
    return sum(m * c for m, c in pairs) / n if n else None


@_command(marker_app, "train")
def marker_train(
    shards: Annotated[
        list[str], typer.Argument(help="Training shards (clean images with labels).")
    ],
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the marker (.safetensors).")
    ],
    arch: Annotated[
        str, typer.Option("--arch", help="Architecture, e.g. resnet18 or smallcnn.")
    ] = "resnet18",
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr")] = 0.05,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Use only the first N images.")
    ] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes")] = None,
    label_field: Annotated[str, typer.Option("--label-field")] = "cls",
    device: Annotated[str, typer.Option("--device")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Train a marking network on your own shards (small-image stem for small images)."""
    from radmark.models.training import train_marker

    def on_epoch(epoch: int, acc: float) -> None:
        if not json_out:
            err.print(f"epoch {epoch}/{epochs}: train accuracy {acc:.3f}")

    res = train_marker(
        shards,
        out_file,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        label_field=label_field,
        num_classes=num_classes,
        limit=limit,
        progress=on_epoch,
    )
    if json_out:
        _emit_json(
            {
                "path": str(res.path),
                "sha256": res.sha256,
                "arch": res.arch,
                "num_classes": res.num_classes,
                "images": res.images,
                "epochs": res.epochs,
                "train_accuracy": res.train_accuracy,
                "seconds": res.seconds,
            }
        )
        return
    err.print(f"marker {res.arch} ({res.num_classes} classes, {res.images} images) -> {res.path}")
    typer.echo(f"sha256:{res.sha256}")


_SPARK = "▁▂▃▄▅▆▇█"


def _spark(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 8))] for v in values)


def _render_verify(res: Any) -> None:
    from rich.panel import Panel

    verdict = (
        "[bold red]MARK DETECTED[/bold red]"
        if res.detected
        else "[bold green]no mark detected[/bold green]"
    )
    head = Table.grid(padding=(0, 2))
    head.add_row("model", f"{res.model} ({res.arch})")
    head.add_row("model sha256", res.model_sha256)
    head.add_row("probe images", str(res.probe_size))
    head.add_row(
        "alpha", f"{res.alpha:g}" + (" (Holm-corrected over keys)" if res.correction else "")
    )
    head.add_row("verdict", verdict)
    out.print(Panel(head, title="radmark verify", expand=False))
    for r in res.results:
        t = Table(title=f"key {r.fingerprint}", title_justify="left")
        t.add_column("test")
        t.add_column("log10 p", justify="right")
        t.add_column("exact")
        t.add_column("what")
        for name, tr in r.tests.items():
            t.add_row(name, f"{tr.log10_p:.2f}", "yes" if tr.exact else "approx.", tr.description)
        n_exact = sum(tr.exact for tr in r.tests.values())
        how = f"Bonferroni minimum over the {n_exact} exact tests" if n_exact > 1 else ""
        t.add_row("[bold]combined (verdict)[/bold]", f"[bold]{r.log10_p:.2f}[/bold]", "yes", how)
        if res.correction:
            t.add_row(
                "after Holm", f"{r.log10_p_adjusted:.2f}", "yes", f"{len(res.results)} keys tested"
            )
        out.print(t)
        info = Table.grid(padding=(0, 2))
        info.add_row("mark record", r.record)
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
        out.print(info)
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")


@_command(app)
def verify(
    model: Annotated[str, typer.Argument(help="MODEL.safetensors, torchvision:NAME or timm:NAME.")],
    probe: Annotated[
        list[str] | None,
        typer.Option("--probe", help="Clean probe shards (never marked), repeatable."),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Key file, key fingerprint or mark record (prefix). Default: every mark record in the keystore.",
        ),
    ] = None,
    marker: Annotated[
        str | None,
        typer.Option(
            "--marker", help="The marking network, if the mark record does not say where it is."
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="Architecture of a weights file without metadata.")
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="Dotted name of the final Linear layer.")
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Significance level of the verdict.")
    ] = 1e-3,
    expect: Annotated[
        str,
        typer.Option(
            "--expect", help="clean: exit 1 when a mark is detected; marked: exit 1 when it is not."
        ),
    ] = "clean",
    probe_limit: Annotated[
        int | None, typer.Option("--probe-limit", help="Use at most N probe images.")
    ] = None,
    center: Annotated[
        bool, typer.Option("--center/--no-center", help="Fit the alignment with an intercept.")
    ] = False,
    pullback: Annotated[
        bool,
        typer.Option(
            "--pullback/--no-pullback",
            help="Also run the exact pull-back test (input gradients through the marker).",
        ),
    ] = True,
    pullback_limit: Annotated[
        int, typer.Option("--pullback-limit", help="Probe images used by the pull-back test.")
    ] = 2000,
    black_box: Annotated[
        bool,
        typer.Option(
            "--black-box",
            help="Run the exact decoy-rank test on the verification kit (outputs only; "
            "`radmark kit build` first). Without --probe it is the only test.",
        ),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    plot_file: Annotated[
        Path | None,
        typer.Option("--plot", help="Write the per-class cosines against the null density (PNG)."),
    ] = None,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Test a model for your radioactive marks. Exit 0: no mark, 1: mark detected, 2: bad input."""
    from radmark.verify.run import plot, result_to_json, verify_model

    if expect not in ("clean", "marked"):
        raise UsageError("--expect must be 'clean' or 'marked'")
    res = verify_model(
        model,
        keystore=keystore,
        probe=probe or [],
        key_ref=key,
        marker_spec=marker,
        arch=arch,
        head=head,
        alpha=alpha,
        device=device,
        probe_limit=probe_limit,
        center=center,
        passphrase=_passphrase_fn(),
        pullback=pullback,
        pullback_limit=pullback_limit,
        black_box=black_box,
    )
    if plot_file is not None:
        plot(res, plot_file)
    if json_out:
        _emit_json(result_to_json(res))
    else:
        _render_verify(res)
    failed = res.detected if expect == "clean" else not res.detected
    raise typer.Exit(1 if failed else 0)


@_command(kit_app, "build")
def kit_build(
    record: Annotated[str, typer.Argument(help="Mark record (address prefix) the kit verifies.")],
    probe: Annotated[
        list[str] | None,
        typer.Option(
            "--probe", help="Clean labelled held-out shards (never marked, never trained on)."
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Owner key file, if the secret is not in the keystore."),
    ] = None,
    decoys: Annotated[
        int, typer.Option("--decoys", help="Decoy carriers per class (K); floor (K+1)^-C.")
    ] = 39,
    per_class: Annotated[int, typer.Option("--per-class", help="Kit images per class.")] = 10,
    marker: Annotated[
        str | None, typer.Option("--marker", help="The marking network, if it moved.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Mark held-out images once per carrier slot (true + decoys) and store the kit (0600)."""
    from radmark.keys.store import Keystore, load_keyfile
    from radmark.marking.kit import build_kit

    store = Keystore.open(keystore)
    rec = store.mark_record(record)
    if key is not None:
        secret, _rec = load_keyfile(key, _passphrase_fn())
    else:
        secret, _rec = store.secret(rec.fingerprint, _passphrase_fn())
    res = build_kit(
        store=store,
        record=rec,
        key=secret,
        probe=probe or [],
        marker_spec=marker,
        decoys=decoys,
        per_class=per_class,
        device=device,
        batch_size=batch_size,
    )
    if json_out:
        _emit_json(_kit_json(res))
        return
    _print_kit(res)
    typer.echo(res.kit_record)


def _kit_json(res: Any) -> dict[str, Any]:
    """The kit build result as JSON: the dataclass's fields, with ``kit_bytes`` named ``bytes``."""
    out = dataclasses.asdict(res)
    out["bytes"] = out.pop("kit_bytes")
    return out


def _print_kit(res: Any) -> None:
    err.print(
        f"kit {res.kit_record}: {res.images} images × {res.decoys + 1} carriers "
        f"({res.markings} markings, PSNR mean {res.psnr_mean:.1f} dB) in {res.seconds:.1f} s, "
        f"{res.kit_bytes} bytes"
    )


def main() -> None:
    app(prog_name="radmark")


if __name__ == "__main__":
    main()
