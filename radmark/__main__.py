"""``python -m radmark``: the same as the ``radmark`` command."""

from radmark.cli import main

main()
