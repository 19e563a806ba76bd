"""Embedding tables for the IWR tests: a 4-d prior of two parts and a narrower target."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.stats as st

from distcur.data import embeddings_key
from distcur.schema import EMBEDDING_SCHEMA
from distcur.store import Store


def embedding_table(z: np.ndarray, source: str, episode_len: int = 50) -> pa.Table:
    n, d = z.shape
    idx = np.arange(n)
    flat = pa.array(np.ascontiguousarray(z, dtype=np.float32).ravel())
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array([source] * n), pa.array(idx // episode_len, pa.int64()), pa.array(idx % episode_len, pa.int32()),
         pa.ListArray.from_arrays(offsets, flat)],
        schema=EMBEDDING_SCHEMA,
    )


def write_embeddings(store: Store, source: str, z: np.ndarray, rows_per_part: int = 1_000_000) -> str:
    key = embeddings_key("test", source)
    store.write_table(key, embedding_table(z, source), stage="embed", rows_per_part=rows_per_part)
    return key


def prior_and_target_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mix = np.linalg.cholesky(np.array([[1.0, 0.5, 0.0, 0.2], [0.5, 1.0, 0.1, 0.0], [0.0, 0.1, 1.0, 0.3],
                                       [0.2, 0.0, 0.3, 1.0]]))
    prior_a = rng.normal(size=(700, 4)) @ mix.T
    prior_b = rng.normal(size=(500, 4)) @ mix.T * 1.5 + 1.0
    target = rng.normal(size=(150, 4)) * 0.4 + np.array([1.0, 0.5, 0.0, -0.5])
    return prior_a, prior_b, target


def two_scipy_kdes(prior: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The reference per-set log-ratio: two independent scipy KDEs (own covariance, Scott's rule)."""
    return st.gaussian_kde(target.T).logpdf(prior.T) - st.gaussian_kde(prior.T).logpdf(prior.T)
