"""``make demo``: the whole chain on an embedded default, in a fresh directory.

Runs the real CLI (as a user would) on data the demo makes itself, so it needs no network and no
downloads. It grows with the product: keygen → keys → carriers → statistics today.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def _radmark(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "radmark.cli", *args]
    print("$ radmark " + " ".join(args), flush=True)
    res = subprocess.run(cmd, text=True, capture_output=True)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode not in (0, 1):
        raise SystemExit(f"demo step failed with exit code {res.returncode}")
    return res


def main(workdir: str = "demo-out") -> None:
    import json

    import numpy as np

    from .carriers import carriers_digest, derive_carriers
    from .keyops import load_secret_key
    from .stats import fisher_log_sf, log_cosine_sf, to_log10

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ks = work / "keys"
    fp = json.loads(_radmark("keygen", "--keystore", str(ks), "--no-passphrase", "--json").stdout)[
        "fingerprint"
    ]
    _radmark("keys", "list", "--keystore", str(ks))
    _radmark("keys", "show", fp[:15], "--keystore", str(ks))

    key, _ = load_secret_key(ks, fp, lambda: None)
    carriers = derive_carriers(key.carrier_seed(), 512, 10, "demo-marker")
    print(
        f"\ncarriers for d=512, C=10: commitment sha256:{carriers_digest(carriers)} "
        "(the carriers themselves stay secret)"
    )
    for c, d, k in [(0.03, 512, 10), (0.03, 512, 1000), (0.5, 2048, 1000)]:
        lp = fisher_log_sf(log_cosine_sf(np.full(k, c), d))
        print(
            f"statistics: {k} classes at cosine {c} in d={d}: combined log10 p = {to_log10(lp):.1f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
