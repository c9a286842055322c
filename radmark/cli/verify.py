"""``radmark verify``: the verdict, its exit code, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radmark.cli.app import (
    EXIT_DETECTED,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    KeystoreOpt,
    app,
    command,
    emit_json,
    passphrase_fn,
    resolve_device,
)
from radmark.errors import RadmarkError, UsageError

EXPECT = ("clean", "marked")


@command(app)
def verify(
    models: Annotated[
        list[str],
        typer.Argument(
            help="MODEL.safetensors, torchvision:NAME or timm:NAME; several models "
            "are tested together, Holm-corrected over models x keys."
        ),
    ],
    probe: Annotated[
        list[str] | None,
        typer.Option("--probe", help="Clean probe shards (never marked), repeatable."),
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            help="Key file, key fingerprint or mark record (prefix); repeat it to test several "
            "keys in one call (Holm over all of them). Default: every mark record in the keystore.",
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
        float | None,
        typer.Option(
            "--alpha",
            help="Significance level of the verdict (default: the plan's, "
            "signed at marking; 1e-3 for records without a plan).",
        ),
    ] = None,
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
        bool | None,
        typer.Option(
            "--center/--no-center",
            help="Fit the alignment with an intercept (default: as planned).",
        ),
    ] = None,
    pullback: Annotated[
        bool | None,
        typer.Option(
            "--pullback/--no-pullback",
            help="Run the exact pull-back test (input gradients through the marker) or not "
            "(default: as planned; on for records without a plan).",
        ),
    ] = None,
    pullback_limit: Annotated[
        int | None,
        typer.Option(
            "--pullback-limit",
            help="Probe images used by the pull-back test (default: as planned, 2000).",
        ),
    ] = None,
    black_box: Annotated[
        bool | None,
        typer.Option(
            "--black-box/--no-black-box",
            help="Run the exact decoy-rank test on the verification kit (outputs only) or not "
            "(default: as planned, on the record's kit; off for records without a plan). "
            "Without --probe it is the only test.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    plot_file: Annotated[
        Path | None,
        typer.Option("--plot", help="Write the per-class cosines against the null density (PNG)."),
    ] = None,
    force: ForceOpt = False,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Test models for your radioactive marks, following each record's verification plan.

    Exit 0: no mark, 1: mark detected, 2: any failure (3: internal error). Options that differ from
    the plan signed at marking make the result exploratory (said in the report and the JSON). A
    passphrase-protected key is unlocked with RADMARK_PASSPHRASE or a prompt; the keystore is
    RADMARK_KEYSTORE when --keystore is not given.
    """
    from radmark.report import console
    from radmark.report.jsonout import verify_json
    from radmark.report.plot import check_target, cosine_plot
    from radmark.verify.run import verify_models

    if expect not in EXPECT:
        raise UsageError(f"--expect must be one of {', '.join(EXPECT)}, not {expect!r}")
    if plot_file is not None:  # checked before any work; written after the verdict
        check_target(plot_file, white_box=bool(probe), force=force,
                     files=[*models, *([marker] if marker else []), *(key or [])], shards=probe or [])  # fmt: skip
    with console.progress("verifying", enabled=not json_out) as bar:
        task = bar.add_task("", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        res = verify_models(
            models,
            keystore=keystore,
            probe=probe or [],
            key_ref=key or None,
            marker_spec=marker,
            arch=arch,
            head=head,
            alpha=alpha,
            device=resolve_device(device),
            probe_limit=probe_limit,
            center=center,
            passphrase=passphrase_fn(),
            pullback=pullback,
            pullback_limit=pullback_limit,
            black_box=black_box,
            progress=on_progress,
        )
    if json_out:
        emit_json(verify_json(res))
    else:
        console.verify(res)
    if plot_file is not None:  # an optional artefact: its failure never replaces the verdict
        try:
            cosine_plot(res, plot_file, overwrite=force)
        except Exception as exc:  # noqa: BLE001 (whatever fails, the verdict above stands)
            why = (
                exc.diagnostics()
                if isinstance(exc, RadmarkError)
                else f"{type(exc).__name__}: {exc}"
            )
            typer.echo(f"radmark: warning: the plot was not written: {why}", err=True)
    failed = res.detected if expect == "clean" else not res.detected
    raise typer.Exit(EXIT_DETECTED if failed else 0)
