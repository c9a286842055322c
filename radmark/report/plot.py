"""The per-class cosine plot of ``radmark verify --plot`` (needs matplotlib: ``radmark[plot]``).

The plot is an optional artefact: its options are checked before any work (:func:`check_target`)
and it is written only after the verdict has been printed, so a plotting problem can never hide
or replace a verdict.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radmark.errors import InputError, UsageError
from radmark.fsutil import check_new_target, place_file

if TYPE_CHECKING:
    from collections.abc import Sequence

    from radmark.verify.run import VerifyResult


def check_target(
    path: Path,
    *,
    white_box: bool,
    force: bool = False,
    files: Sequence[str] = (),
    shards: Sequence[str] = (),
) -> None:
    """Refuse an unwritable or existing target (unless ``force``), one of the run's inputs
    (``files``: models, marker, key file; ``shards``: the probe's specs; never written, even
    with ``force``) or a run without cosines, before anything is computed."""
    if not white_box:
        raise UsageError("--plot shows the white-box cosines: it needs --probe SHARDS")
    from radmark.data.sources import expand_shards, input_files

    check_new_target(path, force=force, what="--plot",
                     inputs=lambda: [*files, *input_files(expand_shards(shards))])  # fmt: skip
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'radmark[plot]'") from None


def cosine_plot(res: VerifyResult, path: Path, *, overwrite: bool = False) -> None:
    """Per-class cosines against the null density of the cosine in R^d, as a PNG.

    Written to a temp file and put in place atomically; an existing ``path`` is kept unless
    ``overwrite`` (``--force``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import special

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res.results:
        if not r.cosines:
            continue
        d = r.dim
        lim = max(0.3, 1.2 * max(abs(c) for c in r.cosines), 6 / math.sqrt(d))
        xs = np.linspace(-lim, lim, 400)
        logf = ((d - 3) / 2) * np.log1p(-(xs**2)) - special.betaln(0.5, (d - 1) / 2)
        ax.plot(xs, np.exp(logf), color="grey", lw=1)
        ax.scatter(
            r.cosines,
            np.zeros(len(r.cosines)),
            marker="|",
            s=400,
            label=f"{r.fingerprint[:15]}… log10 p = {r.log10_p:.1f}",
        )
    ax.set_xlabel("cosine between mapped classifier row and carrier")
    ax.set_ylabel("null density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fig.savefig(fh, dpi=120, format="png")
        place_file(tmp, path, overwrite=overwrite)
    except OSError as exc:
        raise InputError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
