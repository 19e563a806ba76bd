"""The co-training mixture sampler: target with probability alpha, else the weighted prior selection.

Rows are indexed in one space: ``0 .. n_target - 1`` are target steps, ``n_target ..
n_target + n_prior - 1`` are the selected prior steps (in selection order). With ``mixing="bernoulli"``
each batch element is drawn independently: from the target (uniformly) with probability ``alpha``,
otherwise from the prior selection; with ``"split"`` the first ``round(alpha * B)`` elements of every
batch are target rows and the rest prior rows (BehaviorRetrieval concatenates equal-size target and
prior batches): the same mixture in expectation, without its batch-to-batch variance.

How a selection's per-step weights act (``weighting``), one scheme per run:

* ``"sample"`` (default): prior rows are *drawn* with probability proportional to their weight and
  every sample has loss weight 1. Zero-weight rows are never drawn. Low variance when a few rows
  carry most of the weight (IWR ratios, DataMIL scores).
* ``"loss"``: prior rows are drawn *uniformly* and their weight enters the loss as
  ``w_i / mean(w)`` (target rows keep loss weight 1), so in expectation the target still holds a
  share ``alpha`` of the loss. This is the form that a per-sample loss weight (meta-gradients,
  balanced BC) differentiates.

Either way, the batch at a step is a pure function of ``(seed, step)``: a run resumed at step t
draws exactly the batches an uninterrupted run draws, with no sampler state to save.
"""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("sample", "loss")
MIXINGS = ("bernoulli", "split")


class MixtureSampler:
    """Batches of row indices and loss weights for co-training.

    ``prior_weights`` (n_prior,) non-negative; an empty array (or ``alpha == 1``) means
    target-only. ``batch(step)`` returns ``(index (B,) int64, loss_weight (B,) float32)``.
    """

    def __init__(
        self,
        n_target: int,
        prior_weights: np.ndarray,
        alpha: float,
        batch_size: int,
        seed: int,
        weighting: str = "sample",
        mixing: str = "bernoulli",
    ):
        w = np.asarray(prior_weights, np.float64).reshape(-1)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if w.size and (not np.all(np.isfinite(w)) or (w < 0).any()):
            raise ValueError("prior_weights must be finite and non-negative")
        has_prior = w.size > 0 and w.sum() > 0
        if n_target <= 0 and (alpha > 0 or not has_prior):
            raise ValueError(f"no target rows to sample with alpha={alpha}")
        if not has_prior and alpha < 1.0:
            alpha = 1.0  # target-only: an empty or all-zero selection leaves nothing else to draw
        self.n_target, self.n_prior = int(n_target), int(w.size)
        self.alpha, self.batch_size, self.seed, self.weighting = float(alpha), int(batch_size), int(seed), weighting
        self.mixing = mixing
        self._cdf = np.cumsum(w) / w.sum() if has_prior else np.zeros(0)
        self._loss_w = (w / w.mean()).astype(np.float32) if has_prior else np.zeros(0, np.float32)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and loss weights of the batch at ``step`` (a pure function of seed and step)."""
        rng = np.random.default_rng([self.seed, int(step)])
        b = self.batch_size
        from_target = rng.random(b) < self.alpha
        if self.mixing == "split":
            from_target = np.arange(b) < int(round(self.alpha * b))
        target_rows = rng.integers(0, max(self.n_target, 1), size=b)
        weights = np.ones(b, np.float32)
        if self.n_prior and self.alpha < 1.0:
            if self.weighting == "sample":
                prior_rows = np.minimum(np.searchsorted(self._cdf, rng.random(b), side="right"), self.n_prior - 1)
            else:
                prior_rows = rng.integers(0, self.n_prior, size=b)
                weights = np.where(from_target, 1.0, self._loss_w[prior_rows]).astype(np.float32)
            index = np.where(from_target, target_rows, self.n_target + prior_rows)
        else:
            index = target_rows
        return index.astype(np.int64), weights

    def state(self) -> dict:
        """What determines the batch sequence (for checkpoint metadata)."""
        state = {"seed": self.seed, "alpha": self.alpha, "batch_size": self.batch_size, "weighting": self.weighting}
        return {**state, "mixing": self.mixing} if self.mixing != "bernoulli" else state
