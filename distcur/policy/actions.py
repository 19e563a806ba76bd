"""Per-source action standardisation, for training one policy on sources with different action spaces.

When steps of sources whose actions mean different things (an OXE end-effector delta in metres next to
a LeRobot arm's joint targets in radians) are mixed, one set of action statistics over all of them
lets the source with the largest range dominate the loss and puts the others' actions in a corner of
the tanh's range. Each source's actions are mapped to (a - mean_s) / std_s with that source's own
statistics (from its manifest, :func:`distcur.data.source_metadata_of`) before training; a policy
trained so predicts standardised actions, which are mapped back with the statistics of the source it
acts for (the target: evaluation data and the robot it is deployed on) by :meth:`undo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("auto", "global", "per-source")
STD_FLOOR = 1e-6


@dataclass
class ActionStandardizer:
    """``mean[s]``, ``std[s]`` (action_dim,) per source ``s``; ``output`` is the source whose action
    space the policy acts in (undo maps back to it)."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    output: str

    @classmethod
    def from_stats(cls, stats: dict[str, dict], output: str) -> ActionStandardizer:
        """From ``{source: {"action_mean": [...], "action_std": [...]}}`` (manifest metadata)."""
        if output not in stats:
            raise ValueError(f"action standardisation: no statistics for the output source {output!r}; "
                             f"have {sorted(stats)}")
        mean = {s: np.asarray(v["action_mean"], np.float64) for s, v in stats.items()}
        std = {s: np.maximum(np.asarray(v["action_std"], np.float64), STD_FLOOR) for s, v in stats.items()}
        dims = {s: len(m) for s, m in mean.items()}
        if len(set(dims.values())) != 1 or any(len(std[s]) != d for s, d in dims.items()):
            raise ValueError(f"action standardisation: sources have different action widths {dims}")
        return cls(mean=mean, std=std, output=output)

    def apply(self, actions: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Raw actions (N, da) of rows from ``sources`` (N,) -> each standardised by its source's stats."""
        actions = np.asarray(actions, np.float64)
        out = np.empty_like(actions)
        sources = np.asarray(sources).astype(str)
        for s in map(str, np.unique(sources)):
            if s not in self.mean:
                raise ValueError(f"action standardisation: no statistics for source {s!r}; have {sorted(self.mean)}")
            rows = sources == s
            out[rows] = (actions[rows] - self.mean[s]) / self.std[s]
        return out.astype(np.float32)

    def to_output(self, actions: np.ndarray) -> np.ndarray:
        """Raw actions in the output source's space -> standardised (what the policy predicts)."""
        return ((np.asarray(actions, np.float64) - self.mean[self.output]) / self.std[self.output]).astype(np.float32)

    def undo(self, standardised: np.ndarray) -> np.ndarray:
        """Standardised actions (what the policy predicts) -> raw actions of the output source."""
        return (np.asarray(standardised, np.float64) * self.std[self.output] + self.mean[self.output]).astype(np.float32)

    def to_dict(self) -> dict:
        return {"output": self.output, "sources": {s: {"action_mean": self.mean[s].tolist(),
                                                        "action_std": self.std[s].tolist()} for s in self.mean}}

    @classmethod
    def from_dict(cls, d: dict) -> ActionStandardizer:
        return cls.from_stats(d["sources"], d["output"])


# auto: statistics this far apart mean different action spaces, whatever the sources declare
STD_RATIO = 10.0
MEAN_SHIFT_STDS = 3.0


def _within_unit_box(v: dict) -> bool:
    lo, hi = v.get("action_min"), v.get("action_max")
    return lo is not None and hi is not None and min(lo) >= -1.0 and max(hi) <= 1.0


def statistics_differ(stats: dict[str, dict]) -> bool:
    """Whether two sources' action statistics (``action_mean``, ``action_std`` per dim) are too far
    apart to be one action space: a dim whose std differs by more than ``STD_RATIO`` times (dims
    nearly constant in either source, e.g. a gripper held closed, are not compared), or whose means
    differ by more than ``MEAN_SHIFT_STDS`` of the larger std. Sources whose actions all lie in
    [-1, 1] (``action_min`` / ``action_max``: an already normalised space, as MetaWorld's) never differ."""
    names = sorted(stats)
    if all(_within_unit_box(stats[s]) for s in names):
        return False
    mean = {s: np.asarray(stats[s]["action_mean"], np.float64) for s in names}
    std = {s: np.maximum(np.asarray(stats[s]["action_std"], np.float64), STD_FLOOR) for s in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len(mean[a]) != len(mean[b]):
                return True
            big = np.maximum(std[a], std[b])
            varies = np.minimum(std[a], std[b]) > 1e-3 * (big + np.maximum(np.abs(mean[a]), np.abs(mean[b])))
            ratio = big / np.minimum(std[a], std[b])
            shift = np.abs(mean[a] - mean[b]) / big
            if (varies & (ratio > STD_RATIO)).any() or (shift > MEAN_SHIFT_STDS).any():
                return True
    return False


def choose_mode(mode: str, spaces: dict[str, tuple], stats: dict[str, dict]) -> str:
    """``global`` or ``per-source`` for ``mode``, given each mixed source's declared action space
    (:func:`distcur.data.action_space_of`) and action statistics: ``auto`` standardises per source
    when the sources do not all declare one action space or their statistics differ
    (:func:`statistics_differ`)."""
    if mode not in MODES:
        raise ValueError(f"action_normalization must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "per-source" if len(set(spaces.values())) > 1 or statistics_differ(stats) else "global"
