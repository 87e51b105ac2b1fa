"""Comparisons between two compiled programs, with a tolerance scaled to the signal.

Two programs that compute the same thing (jit vs eager, sharded vs one device, cached vs full,
ours vs transformers) round differently: by CPU (AVX2 vs AVX-512 kernels), by XLA's fusion
choices and by thread count. The difference grows with the size of the values compared, so a
bare absolute threshold such as 1e-6 fails on one machine and passes on another. Here the
threshold is ``rel`` times the largest magnitude of the expected values: a wrong result (a
swapped axis, a dropped mask) moves outputs by a sizeable fraction of that, rounding by ~1e-7
of it per operation.
"""

from __future__ import annotations

import numpy as np


def assert_close(actual, desired, rel: float, what: str = "") -> float:
    """Assert max |actual - desired| <= rel * max |desired|; return the relative error."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    err = float(np.abs(actual - desired).max()) if desired.size else 0.0
    assert err <= rel * max(scale, np.finfo(np.float32).tiny), (
        f"{what}: max |difference| {err:.3g} > {rel:g} x max |expected| {scale:.3g}"
    )
    return err / scale if scale else err
