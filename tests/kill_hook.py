"""``python -m tests.kill_hook ARGS``: the radmark CLI with a test-only SIGKILL hook installed.

``RADMARK_TEST_KILL_AT="EVENT:N"`` makes the process SIGKILL itself at the N-th EVENT ("batch",
"write", "shard"; see ``radmark.marking.pipeline.FAULT_HOOK``) to place a crash exactly. The hook
lives here, in the tests, so no installed radmark ever reads that variable.
"""

from __future__ import annotations

import os
import signal

from radmark.cli import main
from radmark.marking import pipeline

_counts: dict[str, int] = {}


def _kill_at(event: str) -> None:
    spec = os.environ.get("RADMARK_TEST_KILL_AT", "")
    name, _, nth = spec.partition(":")
    if name != event:
        return
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    pipeline.FAULT_HOOK = _kill_at
    main()
