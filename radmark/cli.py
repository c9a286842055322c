"""The command line: parse, call one library function, render its result.

Errors the user can cause are :class:`~radmark.errors.RadmarkError`; they are caught in one
place, :func:`_guard` (every command is registered through :func:`_command`), printed as one
line on stderr and turned into exit code 2. Typer's
pretty tracebacks are configured without locals so a secret can never leak into a CI log.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import SCHEMA_VERSION, __version__
from .errors import RadmarkError, UsageError


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
    from .keyops import generate_key

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
    from .keyops import list_entries

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
    from .keyops import show_object

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
    from .keyops import export_public

    data = export_public(keystore, ref)
    if out_file is not None:
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(out_file, data + b"\n")
        err.print(f"wrote {out_file}")
    else:
        sys.stdout.write(data.decode("utf-8") + "\n")


def main() -> None:
    app(prog_name="radmark")


if __name__ == "__main__":
    main()
