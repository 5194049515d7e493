"""Synthetic GSF rows that look like real multi-level pooled activations.

Global-average-pooled post-ReLU feature maps are non-negative and heavy-tailed: per channel the
mean activation spans orders of magnitude (log-normal across channels), a few channels are dead
(exactly zero), and per image each channel varies around its mean with a skewed spread. Uniform
noise compresses very differently (it has no exponent structure to exploit), so codec choices
and throughput figures use this generator instead.
"""

from __future__ import annotations

import numpy as np


def pooled_activations(rows: int, width: int, seed: int = 0, dead_fraction: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channel_mean = rng.lognormal(mean=-1.5, sigma=1.2, size=width).astype(np.float32)
    channel_mean[rng.random(width) < dead_fraction] = 0.0
    out = np.empty((rows, width), np.float16)
    for start in range(0, rows, 1024):  # bounded temporaries for large row counts
        n = min(1024, rows - start)
        spread = rng.gamma(shape=2.0, scale=0.5, size=(n, width)).astype(np.float32)
        out[start:start + n] = channel_mean * spread
    return out
