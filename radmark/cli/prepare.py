"""``radmark mark``, ``radmark marker train`` and ``radmark kit build``."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from radmark.cli.app import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    KeystoreOpt,
    app,
    command,
    emit_json,
    kit_app,
    marker_app,
    passphrase_fn,
    resolve_device,
)
from radmark.errors import UsageError

if TYPE_CHECKING:
    from radmark.marking.run import Progress as MarkProgress

ON_ERROR = ("fail", "skip")


@command(app)
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
        float, typer.Option("--fraction", help="Fraction of samples to mark, in (0, 1].")
    ] = 0.1,
    marker: Annotated[
        str, typer.Option("--marker", help="Marking network: FILE.safetensors or torchvision:NAME.")
    ] = "torchvision:resnet18",
    marker_arch: Annotated[
        str | None,
        typer.Option("--marker-arch", help="Architecture of a marker file without metadata."),
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="Marking method (radioactive: the paper's).")
    ] = "radioactive",
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
    device: DeviceOpt = "auto",
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
    reencode_all: Annotated[
        bool,
        typer.Option(
            "--reencode-all",
            help="Re-encode every image (marked or not) with the same encoder, so that encodings "
            "cannot tell marked samples apart (JPEGs are then all re-compressed once).",
        ),
    ] = False,
    max_batch_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-batch-pixels",
            help="Most decoded pixels (H*W) marked together [default: 4194304 = 2048^2]; larger "
            "images are refused (or skipped). Marking memory grows with it.",
        ),
    ] = None,
    kit_decoys: Annotated[int, typer.Option("--kit-decoys", help="Kit decoys per class.")] = 39,
    kit_per_class: Annotated[
        int, typer.Option("--kit-per-class", help="Kit images per class.")
    ] = 10,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace files named like output shards in an --out that holds no radmark "
            "manifest (refused otherwise). Inputs are never replaced.",
        ),
    ] = False,
    plan_tests: Annotated[
        str | None,
        typer.Option(
            "--plan-tests",
            help="Verification plan: the tests of the verdict, comma-separated (default: the "
            "method's exact tests; the kit test with --kit-probe). Planning the kit test pins "
            "--kit-decoys and --kit-per-class for `radmark kit build`.",
        ),
    ] = None,
    plan_alpha: Annotated[
        float, typer.Option("--plan-alpha", help="Verification plan: the verdict's alpha.")
    ] = 1e-3,
    plan_probe: Annotated[
        list[str] | None,
        typer.Option(
            "--plan-probe",
            help="Verification plan: pin the clean probe shards verification will use (by "
            "content), repeatable. Without it a verification that uses a probe is exploratory.",
        ),
    ] = None,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Mark a fraction of the images in WebDataset shards, shard by shard, and record the mark.

    Output shards keep their input's name and compression (.tar, .tar.gz, .tar.xz, .tar.bz2).
    Images under 8 px on a side are copied unmarked and counted as skipped. A
    passphrase-protected key is unlocked with RADMARK_PASSPHRASE or a prompt.
    """
    from radmark.keys.manage import load_secret_key
    from radmark.marking.methods import get_method
    from radmark.marking.options import KitRequest, MarkOptions
    from radmark.marking.run import mark_shards
    from radmark.report import console
    from radmark.report.jsonout import mark_json
    from radmark.verify.choice import marking_plan

    if on_error not in ON_ERROR:
        raise UsageError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    presets = get_method(method).presets
    if preset not in presets:
        raise UsageError(f"--preset must be one of {', '.join(presets)}, not {preset!r}")
    overrides: dict[str, Any] = {
        k: v
        for k, v in (("steps", steps), ("radius", radius), ("psnr_floor", psnr_floor))
        if v is not None
    }
    options = MarkOptions(
        fraction=fraction,
        method=method,
        preset=preset,
        overrides=overrides,
        num_classes=num_classes,
        label_field=label_field,
        batch_size=batch_size,
        device=resolve_device(device),
        resume=resume,
        on_error=on_error,
        kit=KitRequest(kit_probe, kit_decoys, kit_per_class) if kit_probe else None,
        reencode_all=reencode_all,
        force=force,
    )
    if max_batch_pixels is not None:
        options = replace(options, max_batch_pixels=max_batch_pixels)
    plan = marking_plan(method, tests=plan_tests, alpha=plan_alpha,
                        probe=plan_probe, kit={"decoys": kit_decoys, "per_class": kit_per_class},
                        kit_with_marking=bool(kit_probe))  # fmt: skip
    options = replace(options, plan=plan.to_record())
    secret, record = load_secret_key(keystore, key, passphrase_fn())
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun only rank 0 reports
    with console.progress("marking", enabled=not json_out and rank == 0) as bar:
        task = bar.add_task("", total=None)
        t0 = time.perf_counter()

        def on_progress(p: MarkProgress) -> None:
            status = console.marking_status(p, time.perf_counter() - t0)
            bar.update(task, total=p.shards_total, completed=p.shards_done, description=status)

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
    if json_out:
        emit_json(mark_json(result))
        return
    console.mark(result)
    typer.echo(result.record)


@command(marker_app, "train")
def marker_train(
    shards: Annotated[
        list[str], typer.Argument(help="Training shards (clean images with labels).")
    ],
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the marker (.safetensors).")
    ],
    arch: Annotated[
        str, typer.Option("--arch", help="Architecture, e.g. resnet18, slimresnet or smallcnn.")
    ] = "resnet18",
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training images.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per SGD step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (one-cycle).")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and order.")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Use only the first N images.")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="Classes (default: 1 + the largest label).")
    ] = None,
    label_field: Annotated[
        str, typer.Option("--label-field", help="Member holding the integer label.")
    ] = "cls",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a marking network on your own shards (small-image stem for small images).

    An existing --out is refused unless --force: mark records bind a marker by its hash.
    """
    from radmark.models.training import train_marker
    from radmark.report import console
    from radmark.report.jsonout import train_json

    with console.progress("train", enabled=not json_out) as bar:  # on a terminal only
        task = bar.add_task("loading images", total=None)

        def on_epoch(epoch: int, acc: float) -> None:
            bar.update(task, description=console.marker_epoch(epoch, epochs, acc))

        res = train_marker(
            shards,
            out_file,
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=resolve_device(device),
            label_field=label_field,
            num_classes=num_classes,
            limit=limit,
            progress=on_epoch,
            on_step=lambda done, total: bar.update(task, completed=done, total=total),
            force=force,
        )
    if json_out:
        emit_json(train_json(res))
        return
    console.marker_trained(res)
    typer.echo(f"sha256:{res.sha256}")


@command(kit_app, "build")
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
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images marked together.")] = 256,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Build another kit for a record that has one "
            "(verification still uses the first: kits are built once).",
        ),
    ] = False,
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Mark held-out images once per carrier slot (true + decoys) and store the kit (0600).

    A passphrase-protected key is unlocked with RADMARK_PASSPHRASE or a prompt.
    """
    from radmark.keys.sealing import load_keyfile
    from radmark.keys.store import Keystore
    from radmark.marking.kit import build_kit
    from radmark.report import console
    from radmark.report.jsonout import kit_json

    store = Keystore.open(keystore)
    rec = store.mark_record(record)
    if key is not None:
        secret, _rec = load_keyfile(key, passphrase_fn())
    else:
        secret, _rec = store.secret(rec.fingerprint, passphrase_fn())
    with console.progress("kit", enabled=not json_out) as bar:
        task = bar.add_task("carrier slots", total=None)
        res = build_kit(
            store=store,
            record=rec,
            key=secret,
            probe=probe or [],
            marker_spec=marker,
            decoys=decoys,
            per_class=per_class,
            device=resolve_device(device),
            batch_size=batch_size,
            force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if json_out:
        emit_json(kit_json(res))
        return
    console.kit(res)
    typer.echo(res.kit_record)
