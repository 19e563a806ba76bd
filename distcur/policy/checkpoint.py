"""Policy checkpoints: torch state dicts of plain tensors plus JSON-able metadata, (de)serialised.

Every checkpoint loads with ``torch.load(..., weights_only=True)``: it holds only dicts, lists,
strings, numbers and tensors. Layout in the store (``policies/<run>/``)::

    policy.pt                         the final policy (params + metadata, no optimiser state)
    manifest.json                     commit record of the training stage (config, inputs)
    checkpoints/step-<step:08d>.pt    training state: params, Adam moments, step, metadata
    checkpoints/latest.json           {"key": ..., "step": ...}, written after the checkpoint

A checkpoint dict::

    {"format": "distcur.policy/1", "step": int, "params": {name: tensor},
     "adam": {"m": {name: tensor}, "v": {name: tensor}, "t": tensor} (training state only),
     "meta": {"spec": {...}, "normalizer": {...}, "config": {...}, "sampler": {...}, "history": [...]}}

The sampler needs no saved state: its batches are a pure function of (seed, step). The store
reads and writes of these files are the train stage's (:mod:`distcur.stages.train`).
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import torch

from distcur.policy.functional import Normalizer, Params, PolicySpec
from distcur.torchio import torch_load

FORMAT = "distcur.policy/1"
POLICY_FILE = "policy.pt"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


def spec_to_dict(spec: PolicySpec) -> dict[str, Any]:
    d = asdict(spec)
    d["hidden"] = list(spec.hidden)
    return d


def spec_from_dict(d: dict) -> PolicySpec:
    return PolicySpec(**{**d, "hidden": tuple(d["hidden"])})


def make_state(
    params: Params,
    spec: PolicySpec,
    normalizer: Normalizer,
    step: int,
    opt_state: dict | None = None,
    meta: dict | None = None,
) -> dict[str, Any]:
    """A checkpoint dict (see the module docstring); tensors are detached copies."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": int(step),
        "params": {k: v.detach().clone() for k, v in params.items()},
        "meta": {**(meta or {}), "spec": spec_to_dict(spec), "normalizer": normalizer.to_dict()},
    }
    if opt_state is not None:
        state["adam"] = {
            "m": {k: v.detach().clone() for k, v in opt_state["m"].items()},
            "v": {k: v.detach().clone() for k, v in opt_state["v"].items()},
            "t": opt_state["t"].detach().clone(),
        }
    return state


def to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes, origin: str = "checkpoint") -> dict:
    state = torch_load(data, origin, "retrain the policy with `distcur train --fresh`")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{origin}: not a distcur policy checkpoint (expected format {FORMAT!r})")
    return state


def unpack(state: dict) -> tuple[Params, PolicySpec, Normalizer]:
    """(params, spec, normalizer) of a checkpoint dict."""
    meta = state["meta"]
    return dict(state["params"]), spec_from_dict(meta["spec"]), Normalizer.from_dict(meta["normalizer"])
