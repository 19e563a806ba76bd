"""Policy checkpoints: torch state dicts of plain tensors plus JSON-able metadata.

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

The sampler needs no saved state: its batches are a pure function of (seed, step).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import torch

from distcur.data import policy_key
from distcur.policy.functional import Normalizer, Params, PolicySpec
from distcur.store import Store
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


def save_state(store: Store, key: str, state: dict) -> None:
    """Atomic write of one checkpoint object at ``key`` (relative to the store root)."""
    store.write_bytes(key, to_bytes(state))


def load_state(store: Store, key: str) -> dict:
    try:
        data = store.read_bytes(key)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"no policy checkpoint at {store.uri_of(key)}") from e
    return from_bytes(data, store.uri_of(key))


def checkpoint_key(run: str, step: int) -> str:
    return f"{policy_key(run)}/{CHECKPOINT_DIR}/step-{int(step):08d}.pt"


def save_checkpoint(store: Store, run: str, state: dict) -> str:
    """Write a training checkpoint, then point ``latest.json`` at it; returns its key."""
    key = checkpoint_key(run, state["step"])
    save_state(store, key, state)
    store.write_text(f"{policy_key(run)}/{CHECKPOINT_DIR}/{LATEST}", json.dumps({"key": key, "step": state["step"]}))
    return key


def latest_checkpoint(store: Store, run: str) -> dict | None:
    """The latest training checkpoint of ``run``, or None when it has none."""
    pointer = f"{policy_key(run)}/{CHECKPOINT_DIR}/{LATEST}"
    if not store.exists(pointer):
        return None
    return load_state(store, json.loads(store.read_text(pointer))["key"])


def save_policy(store: Store, run: str, state: dict) -> str:
    """Write the final policy (optimiser state dropped); returns its key."""
    key = f"{policy_key(run)}/{POLICY_FILE}"
    save_state(store, key, {k: v for k, v in state.items() if k != "adam"})
    return key


def load_policy_state(store: Store, run_or_key: str) -> dict:
    """A policy by run name (``policies/<run>/policy.pt``) or by an explicit ``.pt`` key."""
    key = run_or_key if run_or_key.endswith(".pt") else f"{policy_key(run_or_key)}/{POLICY_FILE}"
    return load_state(store, key)
