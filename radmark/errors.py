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
        """One line for the terminal: the problem and, where possible, what to do next."""
        return " ".join(self.message.split())


class UsageError(RadmarkError):
    """Arguments that do not make sense together."""


class InputError(RadmarkError):
    """A file the user pointed us at is unreadable, malformed or unsupported."""


class ShardError(InputError):
    """A WebDataset shard (or one sample in it) is malformed; names the shard and the sample."""

    def __init__(self, shard: str, message: str, sample: str | None = None) -> None:
        where = f"shard {shard}" + (f", sample {sample!r}" if sample is not None else "")
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.sample = sample
        self.reason = message


class ModelError(InputError):
    """A model file or spec cannot be loaded safely or does not fit the key."""


class IntegrityError(RadmarkError):
    """A stored object's hash or signature does not match: tampered or corrupt."""


class KeystoreError(RadmarkError):
    """A key or record cannot be found, is ambiguous, or cannot be unlocked."""
