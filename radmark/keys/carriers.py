"""Deterministic carriers: the secret directions u_c, derived from a key forever.

The official code drew carriers with ``torch.randn`` and no recorded seed, so a lost seed meant a
mark that could never be verified. Here carriers are a pure function of
(carrier seed, d, C, marker identity) defined with operations that IEEE-754 makes exact
(+, −, ×, ÷, sqrt, frexp) and a standard XOF, so every platform and every future version derives
bit-identical float32 vectors. The procedure (format ``radmark-carriers-v1``) is:

1. ``seed = HKDF-SHA256(secret, salt=None, info=b"radmark/v1/carrier-seed", L=32)`` (see keys.py).
2. ``stream = SHAKE-256(seed || canonical_json({"d": d, "C": C, "marker": marker_id,
   "v": "radmark-carriers-v1"}))``.
3. Read the stream as little-endian uint64 words; word w gives ``v = (w >> 11) · 2⁻⁵² − 1`` in
   [−1, 1) (53 random bits, exact). Consecutive words form pairs (a, b).
4. Marsaglia's polar method: s = a² + b²; reject the pair if s == 0 or s ≥ 1; otherwise emit
   ``a·f, b·f`` with ``f = sqrt(−2·ln(s)/s)``. ``ln`` is :func:`exact_ln` below (frexp + a fixed
   14-term atanh series, Horner order), not the platform libm, which may differ by an ulp.
5. Fill a float64 [C, d] matrix row-major with the first C·d normals; per row, the squared
   norm is accumulated sequentially over columns 0..d−1; the row is divided by its sqrt and
   rounded to float32 (round-to-nearest-even).

Each row is then a uniform random direction on the sphere S^{d−1} (up to the 53-bit
quantisation of the uniforms), i.i.d. across classes: the exact null of the tests relies on it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from radmark.canonical import canonical_json, sha256_hex
from radmark.errors import UsageError

CARRIER_FORMAT = "radmark-carriers-v1"
_LN2 = 0.6931471805599453  # float64 nearest to ln 2
_SERIES_TERMS = 14
_COEFS = [1.0 / (2 * k + 1) for k in range(_SERIES_TERMS)]  # correctly rounded divisions


def exact_ln(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64 values using only exactly-specified IEEE operations.

    x = m·2^e with m in [√½, √2); ln m = 2·atanh(y), y = (m−1)/(m+1), |y| ≤ 0.1716, so 14
    terms of the odd series reach float64 precision. Identical bits on every IEEE platform.
    Part of the carrier format (step 4 of the module docstring), hence a public name.
    """
    m, e = np.frexp(x)  # m in [0.5, 1)
    small = m < 0.7071067811865476
    m = np.where(small, m * 2.0, m)
    e = np.where(small, e - 1, e).astype(np.float64)
    y = (m - 1.0) / (m + 1.0)
    y2 = y * y
    p = np.full_like(y, _COEFS[-1])
    for c in reversed(_COEFS[:-1]):
        p = p * y2 + c
    return e * _LN2 + 2.0 * y * p


def _stream(seed: bytes, d: int, num_classes: int, marker_id: str, nbytes: int) -> bytes:
    tag = canonical_json({"C": num_classes, "d": d, "marker": marker_id, "v": CARRIER_FORMAT})
    return hashlib.shake_256(seed + tag).digest(nbytes)


def derive_carriers(seed: bytes, d: int, num_classes: int, marker_id: str) -> np.ndarray:
    """Carriers u_c as float32 [C, d] unit rows; see the module docstring for the exact procedure.

    ``seed`` is the key's carrier seed (never the raw secret); ``marker_id`` binds the carriers
    to one marking network so two markers never share directions.
    """
    if len(seed) != 32:
        raise UsageError("carrier seed must be 32 bytes")
    if d < 2 or num_classes < 1:
        raise UsageError(f"carriers need d >= 2 and C >= 1 (got d={d}, C={num_classes})")
    need = d * num_classes
    # Polar method accepts pi/4 of pairs; ask for 30% slack plus a constant, extend if short.
    pairs = int(need / 2 / (np.pi / 4) * 1.3) + 64
    while True:
        words = np.frombuffer(_stream(seed, d, num_classes, marker_id, pairs * 16), dtype="<u8")
        v = (words >> np.uint64(11)).astype(np.float64) * (2.0**-52) - 1.0
        a, b = v[0::2], v[1::2]
        s = a * a + b * b
        ok = (s > 0.0) & (s < 1.0)
        a, b, s = a[ok], b[ok], s[ok]
        if 2 * a.size >= need:
            break
        pairs *= 2
    f = np.sqrt((-2.0 * exact_ln(s)) / s)
    normals = np.empty(2 * a.size, dtype=np.float64)
    normals[0::2] = a * f
    normals[1::2] = b * f
    z = normals[:need].reshape(num_classes, d)
    sq = np.zeros(num_classes, dtype=np.float64)
    for j in range(d):  # sequential sum: no dependence on SIMD width or pairwise order
        sq = sq + z[:, j] * z[:, j]
    return (z / np.sqrt(sq)[:, None]).astype(np.float32)


def carriers_digest(carriers: np.ndarray) -> str:
    """SHA-256 hex of the carriers as little-endian float32, row-major: the commitment."""
    return sha256_hex(np.ascontiguousarray(carriers, dtype="<f4").tobytes())
