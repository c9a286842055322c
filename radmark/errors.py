"""One error base for everything a user can cause.

The CLI catches :class:`RadmarkError` once, prints ``diagnostics()`` as one line on stderr and exits
with ``exit_code`` (2). Anything else is a bug and is allowed to show a traceback (without locals).
Messages must never contain secret material or carriers.
"""

from __future__ import annotations


class RadmarkError(Exception):
    """A user-facing failure: bad input, integrity failure, wrong key or passphrase."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def diagnostics(self) -> str:
        """One line for the terminal: the problem and, where possible, what to do next.

        Names that are not valid UTF-8 (a shard or member name's raw bytes, kept as surrogate
        escapes) are shown as ``\\xNN`` so the line can always be printed and put in JSON.
        """
        return " ".join(_printable(self.message).split())


def _printable(text: str) -> str:
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no byte produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UsageError(RadmarkError):
    """Arguments that do not make sense together."""


class InputError(RadmarkError):
    """A file the user pointed us at is unreadable, malformed or unsupported."""


class ShardError(InputError):
    """A WebDataset shard (or one sample in it) is malformed; names the shard and the sample."""

    def __init__(self, shard: str, message: str, sample: str | None = None) -> None:
        shown = None
        if sample is not None:  # a name that is not UTF-8 shows its bytes as \xNN, like the shard
            shown = repr(sample) if _printable(sample) == sample else f"'{_printable(sample)}'"
        where = f"shard {shard}" + (f", sample {shown}" if shown is not None else "")
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.sample = sample
        self.reason = message


class ImageTooLarge(ShardError):
    """An image over the pixel limit: a type of its own so the marking pipeline can name the
    option that raises the limit without reading the message text."""


class ModelError(InputError):
    """A model file or spec cannot be loaded safely or does not fit the key."""


class IntegrityError(RadmarkError):
    """A stored object's hash or signature does not match: tampered or corrupt."""


class KeystoreError(RadmarkError):
    """A key or record cannot be found, is ambiguous, or cannot be unlocked."""


def check_count(option: str, value: int | None, lo: int = 1) -> None:
    """Refuse a count option below ``lo`` (``None`` = not given): one line naming the option.

    Numeric options are checked where the library function starts, before any work, so that a
    zero or negative value is a usage error and never a ``ZeroDivisionError`` or an empty run
    hours later (issue #12).
    """
    if value is not None and (isinstance(value, bool) or value < lo):
        raise UsageError(f"{option} must be at least {lo}, got {value}")


def check_positive(option: str, value: float | None, *, below: float | None = None) -> None:
    """Refuse a real option that is not a finite number > 0 (and < ``below`` when given)."""
    import math

    if value is None:
        return
    ok = math.isfinite(value) and value > 0 and (below is None or value < below)
    if not ok:
        where = f"in (0, {below:g})" if below is not None else "a finite number > 0"
        raise UsageError(f"{option} must be {where}, got {value}")
