"""``radmark keygen`` and ``radmark keys list | show | export-public | import``."""

from __future__ import annotations

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
    from radmark.report.jsonout import keygen_json

    if out_file is not None:  # before the passphrase prompt, not after
        check_new_target(out_file, force=force, what="--out", may_replace_secret=True)
    if passphrase is False:
        pw = None
    else:
        pw = passphrase_from_env_or_prompt(confirm=True)
        if passphrase and not pw:
            raise UsageError("--passphrase needs RADMARK_PASSPHRASE or an interactive terminal")
    result = generate_key(keystore, passphrase=pw, out_file=out_file, force=force)
    if json_out:
        emit_json(keygen_json(result))
        return
    console.keygen(result)
    typer.echo(result.fingerprint)


@command(keys_app, "list")
def keys_list(keystore: KeystoreOpt = Path("keys"), json_out: JsonOpt = False) -> None:
    """List keys and mark records (every object is re-hashed and its signature checked)."""
    from radmark.keys.manage import list_keystore
    from radmark.report import console
    from radmark.report.jsonout import keys_list_json

    listing = list_keystore(keystore)
    if json_out:
        emit_json(keys_list_json(listing))
        return
    console.keys_list(listing)


@command(keys_app, "show")
def keys_show(
    ref: Annotated[str, typer.Argument(help="Fingerprint, address or a unique prefix of one.")],
    keystore: KeystoreOpt = Path("keys"),
    json_out: JsonOpt = False,
) -> None:
    """Show a key's public record or a mark record (verified)."""
    from radmark.keys.manage import show_object
    from radmark.report import console
    from radmark.report.jsonout import keys_show_json

    shown = show_object(keystore, ref)
    if json_out:
        emit_json(keys_show_json(shown))
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
    document instead: {"schema_version", "address", "record", "path"}.
    """
    from radmark.keys.manage import export_public
    from radmark.report import console
    from radmark.report.jsonout import public_export_json

    res = export_public(keystore, ref, out_file, force=force)
    if json_out:
        emit_json(public_export_json(res))
        return
    console.public_export(res)


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
    from radmark.report.jsonout import key_import_json

    res = import_key(keystore, key_file, passphrase_fn())
    if json_out:
        emit_json(key_import_json(res))
        return
    console.key_imported(res)
    typer.echo(res.fingerprint)
