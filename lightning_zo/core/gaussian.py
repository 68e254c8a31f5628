"""The Gaussian inverse-CDF table: integer-indexed, so a Gaussian draw is the same float on every device."""

from __future__ import annotations

import functools
import hashlib
import statistics

import numpy as np


@functools.cache
def gaussian_table() -> np.ndarray:
    """float32[65536]: the midpoint quantiles of N(0, 1), rescaled to unit second moment."""
    dist = statistics.NormalDist()
    q = np.array([dist.inv_cdf((h + 0.5) / 65536) for h in range(65536)], dtype=np.float64)
    q /= np.sqrt(np.mean(q * q))
    return q.astype(np.float32)


def gaussian_table_sha256() -> str:
    return hashlib.sha256(gaussian_table().tobytes()).hexdigest()
