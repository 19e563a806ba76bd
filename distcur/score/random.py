"""The random baseline: a uniform [0, 1) score per step, a pure function of (seed, source, episode, step).

Hash-based rather than drawn from a stream, so the score of a step does not depend on how the
prior is sharded or ordered.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def random_scores(source: str, episode: np.ndarray, step: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) float64 uniform scores in [0, 1) for the steps (source, episode[i], step[i])."""
    episode = np.asarray(episode, np.int64)
    step = np.asarray(step, np.int64)
    if episode.shape != step.shape:
        raise ValueError(f"random_scores: episode {episode.shape} and step {step.shape} differ in shape")
    salt = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}\x00{source}".encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        h = _splitmix64(episode.astype(np.uint64) ^ salt)
        h = _splitmix64(h ^ step.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
