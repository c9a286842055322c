"""``radmark keygen`` and ``radmark keys list | show | export-public``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from radmark.cli.app import (
    ForceOpt,
    JsonOpt,
    KeystoreOpt,
    app,
    command,
    emit_json,
    keys_app,
    passphrase_from_env_or_prompt,
)
from radmark.errors import UsageError


@command(app)
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
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a new signed secret key in the keystore and print its fingerprint."""
    from radmark.fsutil import check_new_target
    from radmark.keys.manage import generate_key
    from radmark.report import console

    if out_file is not None:  # before the passphrase prompt, not after
        check_new_target(out_file, force=force, what="--out")
    if passphrase is False:
        pw = None
    else:
        pw = passphrase_from_env_or_prompt(confirm=True)
        if passphrase and not pw:
            raise UsageError("--passphrase needs RADMARK_PASSPHRASE or an interactive terminal")
    result = generate_key(keystore, passphrase=pw, out_file=out_file, force=force)
    if json_out:
        emit_json(
            {
                "fingerprint": result.fingerprint,
                "path": str(result.path),
                "keystore": str(result.keystore),
                "encrypted": result.encrypted,
                "key_file": str(result.key_file) if result.key_file else None,
            }
        )
        return
    console.keygen(result)
    typer.echo(result.fingerprint)


@command(keys_app, "list")
def keys_list(keystore: KeystoreOpt = Path("keys"), json_out: JsonOpt = False) -> None:
    """List keys and mark records (every object is re-hashed and its signature checked)."""
    from radmark.keys.manage import list_entries
    from radmark.report import console

    entries = list_entries(keystore)
    if json_out:
        emit_json(
            {
                "entries": [
                    {"kind": e.kind, "address": f"sha256:{e.address}", **e.summary} for e in entries
                ]
            }
        )
        return
    console.keys_list(entries, str(keystore))


@command(keys_app, "show")
def keys_show(
    ref: Annotated[str, typer.Argument(help="Fingerprint, address or a unique prefix of one.")],
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Show a key's public record or a mark record (verified)."""
    from radmark.keys.manage import show_object
    from radmark.report import console

    shown = show_object(keystore, ref)
    if json_out:
        emit_json(
            {
                "address": shown.address,
                "kind": shown.kind,
                "record": shown.record,
                "has_secret": shown.has_secret,
            }
        )
        return
    console.keys_show(shown)


@command(keys_app, "export-public")
def keys_export_public(
    ref: Annotated[str, typer.Argument(help="Fingerprint, address or a unique prefix of one.")],
    keystore: KeystoreOpt = Path("keys"),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to FILE instead of stdout.")
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Print what can be published: the signed public record (never the secret).

    Without --out the record's canonical bytes go to stdout. Under --json stdout carries one
    document instead: ``{"schema_version", "address", "record", "path"}``.
    """
    import json

    from radmark.fsutil import atomic_write_bytes, check_new_target
    from radmark.keys.manage import export_public

    if out_file is not None:
        check_new_target(out_file, force=force, what="--out")
    data = export_public(keystore, ref)
    if out_file is not None:
        from radmark.report import console

        atomic_write_bytes(out_file, data + b"\n", overwrite=force)
        if not json_out:
            console.err().print(f"wrote {out_file}")
    if json_out:
        from radmark.canonical import address, sha256_hex

        emit_json(
            {
                "address": address(sha256_hex(data)),
                "record": json.loads(data),
                "path": str(out_file) if out_file is not None else None,
            }
        )
    elif out_file is None:
        sys.stdout.write(data.decode("utf-8") + "\n")


@command(keys_app, "import")
def keys_import(
    key_file: Annotated[Path, typer.Argument(help="An owner key file (radmark keygen --out).")],
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Import a key file made on another machine into the keystore (verified first).

    A passphrase-protected key file is unlocked with RADMARK_PASSPHRASE or a prompt and stays
    encrypted with the same passphrase in the keystore.
    """
    from radmark.cli.app import passphrase_fn
    from radmark.keys.manage import import_key
    from radmark.report import console

    res = import_key(keystore, key_file, passphrase_fn())
    if json_out:
        emit_json({"fingerprint": res.fingerprint, "path": str(res.path),
                   "keystore": str(res.keystore), "encrypted": res.encrypted,
                   "already_present": res.already})  # fmt: skip
        return
    what = "already in" if res.already else "imported into"
    console.err().print(f"key {res.fingerprint} {what} keystore {res.keystore}")
    typer.echo(res.fingerprint)
