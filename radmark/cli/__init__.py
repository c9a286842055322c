"""The command line (``radmark``): each command parses, calls one library function, renders.

Importing this package registers every command on :data:`app`.
"""

from radmark.cli import keys, prepare, verify  # noqa: F401  (each module registers its commands)
from radmark.cli.app import app, main

__all__ = ["app", "main"]
