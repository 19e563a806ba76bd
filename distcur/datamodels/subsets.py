"""Random subsets of the prior's clusters for the regression datamodels.

Mask j keeps each of C clusters independently with probability p. A mask is a pure function
of (seed, j), so any worker can rebuild any model's mask from its id, and the store keeps
them as a table (``datamodels/<run>/masks``) for the regression and for audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from distcur.policy.ensemble import ensemble_loss, init_ensemble, sample_batches, train_ensemble
from distcur.policy.functional import AdamConfig, PolicySpec

MASK_SCHEMA = pa.schema(
    [
        pa.field("model", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" (fits tau) or "heldout" (LDS)
        pa.field("mask", pa.binary(), nullable=False),  # np.packbits of the (C,) bool mask
    ]
)


def subset_mask(model: int, n_clusters: int, keep_prob: float, seed: int) -> np.ndarray:
    """(C,) bool: the clusters model ``model`` trains on."""
    if not 0 < keep_prob < 1:
        raise ValueError(f"keep_prob must be in (0, 1), got {keep_prob}")
    return np.random.default_rng([int(seed), int(model)]).random(n_clusters) < keep_prob


def subset_masks(models: np.ndarray | range, n_clusters: int, keep_prob: float, seed: int) -> np.ndarray:
    """(m, C) bool masks of ``models``."""
    return np.stack([subset_mask(int(j), n_clusters, keep_prob, seed) for j in models]).reshape(-1, n_clusters)


def masks_table(models: np.ndarray, splits: list[str], masks: np.ndarray) -> pa.Table:
    packed = [np.packbits(m).tobytes() for m in masks]
    return pa.Table.from_pydict(
        {"model": np.asarray(models, np.int64), "split": list(splits), "mask": packed}, schema=MASK_SCHEMA
    )


def masks_from_table(table: pa.Table, n_clusters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(models (m,), splits (m,), masks (m, C) bool) from a :data:`MASK_SCHEMA` table."""
    raw = table.column("mask").to_pylist()
    masks = np.stack([np.unpackbits(np.frombuffer(b, np.uint8))[:n_clusters].astype(bool) for b in raw])
    return (
        table.column("model").to_numpy(),
        np.asarray(table.column("split").to_pylist(), dtype=object),
        masks,
    )


@dataclass
class SubsetTrainingData:
    """Everything a worker needs to train subset models, as plain arrays.

    The pool holds the prior rows (``group`` = their cluster id, 0..C-1) followed by the
    injected target half (``group`` = -1, kept by every model); the proxy half is held apart.
    States are normalised, actions in (-1, 1).
    """

    obs: np.ndarray  # (N, ds) float32
    act: np.ndarray  # (N, da) float32
    group: np.ndarray  # (N,) int64
    n_clusters: int
    proxy_obs: np.ndarray  # (Np, ds) float32
    proxy_act: np.ndarray  # (Np, da) float32


def train_subset_models(
    data: SubsetTrainingData,
    masks: np.ndarray,
    init_seeds: np.ndarray,
    spec: PolicySpec,
    adam: AdamConfig,
    steps: int,
    batch_size: int,
    target_fraction: float,
    batch_seed: int,
    proxy: str = "nll",
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Train one stacked policy per mask (k, C) at once and return each one's proxy loss, (k,).

    Model j starts from ``init_params(spec, seed=init_seeds[j])``; all k share the minibatch
    sequence drawn from ``batch_seed`` (the per-model masks weight the rows). ``proxy``: see
    :mod:`distcur.datamodels.proxy`. ``device``: where the models train (a Ray Train worker's GPU);
    the init and the minibatch rows are drawn on the CPU, so the draws do not depend on it."""
    if masks.shape != (len(init_seeds), data.n_clusters):
        raise ValueError(f"train_subset_models: masks {masks.shape} do not match {len(init_seeds)} models x "
                         f"{data.n_clusters} clusters")
    device = torch.device(device)
    obs = torch.as_tensor(data.obs, device=device)
    act = torch.as_tensor(data.act, device=device)
    group = torch.as_tensor(data.group, device=device)
    params, state = init_ensemble(spec, [int(s) for s in init_seeds])
    if device.type != "cpu":
        params = {k: v.to(device) for k, v in params.items()}
        state = {"m": {k: v.to(device) for k, v in state["m"].items()},
                 "v": {k: v.to(device) for k, v in state["v"].items()}, "t": state["t"].to(device)}
    batches = sample_batches(data.group, steps, batch_size, target_fraction, batch_seed)
    params, _, _ = train_ensemble(params, state, spec, adam, obs, act, group, torch.as_tensor(masks, device=device),
                                  batches)
    losses = ensemble_loss(params, spec, torch.as_tensor(data.proxy_obs, device=device),
                           torch.as_tensor(data.proxy_act, device=device), proxy)
    return losses.double().cpu().numpy()


@dataclass(frozen=True)
class SubsetTrainSettings:
    """How each subset model is trained (identical for every batch of a run)."""

    spec: PolicySpec
    adam: AdamConfig
    steps: int
    batch_size: int
    target_fraction: float
    seed: int
    shared_init: bool = True  # every model starts from the same init and sees the same minibatch rows
    proxy: str = "nll"  # distcur.policy.proxy.PROXIES

    def as_dict(self) -> dict:
        return {
            "hidden": list(self.spec.hidden),
            "state_dim": self.spec.state_dim,
            "action_dim": self.spec.action_dim,
            "adam": self.adam.__dict__,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "target_fraction": self.target_fraction,
            "seed": self.seed,
            "shared_init": self.shared_init,
            "proxy": self.proxy,
        }


def plan_batches(models: np.ndarray, models_per_batch: int) -> list[np.ndarray]:
    """Model ids cut into consecutive batches."""
    if models_per_batch <= 0:
        raise ValueError(f"models_per_batch must be positive, got {models_per_batch}")
    return [models[i : i + models_per_batch] for i in range(0, len(models), models_per_batch)]


def train_batch(data: SubsetTrainingData, batch: int, models: np.ndarray, masks: np.ndarray,
                settings: SubsetTrainSettings, device: torch.device | str = "cpu") -> np.ndarray:
    """The proxy losses (k,) of batch ``batch``'s models (ids ``models``, masks (k, C)), trained
    stacked: with ``shared_init`` every model of the run starts from the same init and sees the
    same minibatch rows, else model j from seed ``seed + j`` and each batch its own rows."""
    batch_seed = settings.seed if settings.shared_init else settings.seed * 1_000_003 + batch
    init_seeds = np.full(len(models), settings.seed) if settings.shared_init else np.asarray(models) + settings.seed
    return train_subset_models(data, masks, init_seeds, settings.spec, settings.adam, settings.steps,
                               settings.batch_size, settings.target_fraction, batch_seed, settings.proxy, device)
