"""The command line (``radmark``): each command parses, calls one library function, renders."""

from radmark.cli.app import app, main

__all__ = ["app", "main"]
