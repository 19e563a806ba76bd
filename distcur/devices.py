"""``--device auto|cpu|cuda``: where a torch stage runs, and the Ray resources that matches.

- :func:`resolve_device` picks the device in the process that computes: ``auto`` is CUDA when
  ``torch.cuda.is_available()``, else the CPU; ``cuda`` without CUDA is an error.
- :func:`ray_gpus` is what a stage asks Ray for per actor / worker: ``cpu`` -> 0; ``cuda`` -> 1
  (an error on a local Ray without GPUs, where it would wait for ever; on a cluster the
  autoscaler adds GPU nodes); ``auto`` -> 1 when the Ray cluster has a GPU now, else 0. Inside
  the actor, ``auto`` then resolves to CUDA exactly when Ray gave it a GPU.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def check_device(name: str, what: str = "device") -> str:
    if name not in DEVICES:
        raise ValueError(f"{what} must be one of {DEVICES}, got {name!r}")
    return name


def resolve_device(name: str = "auto", what: str = "device"):
    """The ``torch.device`` for ``name`` in this process."""
    import torch

    check_device(name, what)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"{what} 'cuda' was asked for but torch sees no CUDA device here (torch {torch.__version__}, "
                         f"{built}); use 'auto' or 'cpu'")
    return torch.device("cpu")


def ray_gpus(name: str, what: str = "device", local: bool | None = None) -> float:
    """GPUs to request per actor / worker for device ``name`` on the connected Ray cluster."""
    import ray

    check_device(name, what)
    if name == "cpu":
        return 0.0
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if name == "auto":
        return 1.0 if have >= 1 else 0.0
    if have < 1:
        if local if local is not None else _local_ray():
            raise ValueError(f"{what} 'cuda' was asked for but the local Ray has no GPU "
                             f"(ray.cluster_resources() lists {have:g}); use 'auto' or 'cpu'")
        log.warning("%s 'cuda': the Ray cluster has no GPU yet; the work waits until the autoscaler adds a "
                    "GPU node", what)
    return 1.0


def _local_ray() -> bool:
    """Whether the connected Ray is this machine alone (one live node, at this machine's address):
    no autoscaler will add a GPU node to it."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) <= 1 and all(n.get("NodeManagerAddress") == ray.util.get_node_ip_address() for n in nodes)


def actor_device(name: str, what: str = "device"):
    """The device inside a Ray actor / task: CUDA exactly when Ray assigned this process a GPU
    (for ``auto`` and ``cuda``), else the CPU."""
    import ray
    import torch

    check_device(name, what)
    if name != "cpu" and ray.get_gpu_ids():
        return resolve_device("cuda", what)
    if name == "cuda":
        return resolve_device("cuda", what)  # asked for CUDA and given no GPU: the same clear error
    return torch.device("cpu")
