"""The ``radmark`` application: commands register here; failures are mapped to exit codes once.

Exit codes (docs/ci.md, README): 0 success, 1 "radioactive mark detected" (``verify`` only, or
"not detected" under ``--expect marked``), 2 any failure a user can cause or fix (bad input,
usage, integrity, wrong key or passphrase, a plot that cannot be written), 3 an unexpected
internal error (a bug: please report it). Nothing else ever exits 0 or 1: every command is
registered through :func:`command`, whose guard turns every exception into one line on stderr and,
under ``--json``, one JSON error object on stdout, so ``--json > report.json`` is never empty.
Tracebacks are never printed (they could show secrets in a CI log); ``RADMARK_DEBUG=1`` re-raises.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from radmark import __version__
from radmark.errors import RadmarkError

EXIT_DETECTED = 1
EXIT_FAILURE = 2
EXIT_INTERNAL = 3


def _fail(kind: str, message: str, code: int, json_out: bool) -> typer.Exit:
    from radmark.report.jsonout import error_document

    line = " ".join(message.split())
    if json_out:
        sys.stdout.write(error_document(kind, line))
        sys.stdout.flush()
    typer.echo(f"radmark: error: {line}", err=True)
    return typer.Exit(code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The single place where every failure becomes one line on stderr and exit 2 (or 3)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except RadmarkError as exc:
            raise _fail(type(exc).__name__, exc.diagnostics(), exc.exit_code, json_out) from None
        except (typer.Abort, KeyboardInterrupt, EOFError):
            raise _fail("Aborted", "interrupted", EXIT_FAILURE, json_out) from None
        except MemoryError:
            raise _fail(
                "MemoryError", "out of memory (lower --batch-size or the input sizes)",
                EXIT_FAILURE, json_out,
            ) from None  # fmt: skip
        except Exception as exc:
            if os.environ.get("RADMARK_DEBUG") == "1":
                raise
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise _fail(
                "InternalError",
                f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); this is "
                "a bug in radmark, please report it (RADMARK_DEBUG=1 shows the traceback)",
                EXIT_INTERNAL,
                json_out,
            ) from None

    return wrapper


def command(parent: typer.Typer, name: str | None = None) -> Callable[..., Any]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        parent.command(name)(_guard(fn))
        return fn

    return register


def _typer(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        pretty_exceptions_enable=False,
        add_completion=True,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


app = _typer(
    "radmark: mark image datasets radioactively and test models for the mark, with exact p-values."
)
keys_app = _typer("List, show, import and export keys and mark records in the keystore.")
app.add_typer(keys_app, name="keys")
marker_app = _typer("Marking networks: train one on your own shards.")
app.add_typer(marker_app, name="marker")
kit_app = _typer("Verification kits: decoy-marked probe images for the exact black-box test.")
app.add_typer(kit_app, name="kit")

KeystoreOpt = Annotated[
    Path,
    typer.Option(
        "--keystore",
        envvar="RADMARK_KEYSTORE",
        help="Keystore directory (env RADMARK_KEYSTORE).",
        show_default=True,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output file (never done otherwise).")
]
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(value: str) -> str:
    """``auto`` (the default): cuda when a GPU is there, else cpu; ``cuda:N`` is accepted too."""
    from radmark.errors import UsageError

    if value == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise UsageError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, not {value!r}")


DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (GPU when there is one), cpu, cuda or cuda:N.")
]


def emit_json(obj: dict[str, Any]) -> None:
    from radmark.report.jsonout import document

    sys.stdout.write(document(obj))
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


def passphrase_fn() -> Callable[[], str | None]:
    return lambda: passphrase_from_env_or_prompt(confirm=False)


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
    """radmark: mark image datasets radioactively and test models for the mark.

    Exit codes: 0 success (verify: no mark), 1 mark detected (verify only), 2 any failure,
    3 internal error.
    """


def main() -> None:
    """The console script: also maps usage errors and aborts to exit 2 (never 1)."""
    from typer._click.exceptions import ClickException

    json_out = "--json" in sys.argv[1:]
    try:
        rv = app(prog_name="radmark", standalone_mode=False)
    except ClickException as exc:
        code = _fail("UsageError", exc.format_message(), EXIT_FAILURE, json_out).exit_code
        raise SystemExit(code) from None
    except (typer.Abort, KeyboardInterrupt, EOFError):
        raise SystemExit(EXIT_FAILURE) from None
    except BrokenPipeError:
        raise SystemExit(EXIT_FAILURE) from None
    raise SystemExit(rv if isinstance(rv, int) else 0)
