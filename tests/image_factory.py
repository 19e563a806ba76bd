"""Synthetic image sources for the tests: frames of a blob at a known position, ingested as PNG / JPEG."""

from __future__ import annotations

import numpy as np

from distcur.data import steps_key
from distcur.schema import steps_table
from distcur.sources.common import encode_image
from distcur.store import Store


def blob_frames(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames of one bright square on a dark background whose position is a 2-d latent (the 'state')."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 1, size=(n, 2)).astype(np.float32)
    frames = np.full((n, size, size, 3), 20, np.uint8)
    s = max(2, size // 5)
    for i, (x, y) in enumerate(pos):
        r, c = int(y * (size - s)), int(x * (size - s))
        frames[i, r:r + s, c:c + s] = (230, 200, 40)
    return frames, pos


def write_image_source(store: Store, source: str, episodes: int, length: int, seed: int, size: int = 32,
                       fmt: str = "png", rows_per_part: int = 64) -> np.ndarray:
    n = episodes * length
    frames, pos = blob_frames(n, size, seed)
    step = np.tile(np.arange(length), episodes)
    action = np.concatenate([pos, -pos], 1).astype(np.float32)
    table = steps_table({"source": source, "episode": np.repeat(np.arange(episodes), length), "step": step,
                         "task": ["reach"] * n, "state": np.concatenate([pos, pos ** 2], 1), "action": action,
                         "image": [encode_image(f, fmt) for f in frames],
                         "is_first": step == 0, "is_last": step == length - 1, "is_terminal": step == length - 1})
    store.write_table(steps_key(source), table, "ingest", {"seed": seed}, rows_per_part=rows_per_part)
    return frames
