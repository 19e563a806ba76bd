"""Optional dependencies: which extra of ``pyproject.toml`` enables which stage, and one clear line
when a stage's package is missing.

A stage module imports an optional package through :func:`require` (inside the function that needs
it, so the base install can import every module); a missing package is then one line naming the
extra to install, ``pip install 'distcur[<extra>]'``, instead of a traceback.
``tests/test_deps.py`` checks that every third-party import of ``distcur/`` is declared in
pyproject (base or an extra) and that the Docker image installs :data:`CLUSTER_EXTRAS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> the extra that provides it (the base dependencies need no entry)
EXTRA_OF = {
    "h5py": "hdf5",
    "PIL": "images",  # decoding camera frames (embed); also in the hdf5 extra, which encodes them
    "transformers": "hub",
    "av": "video",  # LeRobot video features (PyAV, FFmpeg's decoders; no torchvision)  # the backbone encoder's transformers models
    "sklearn": "datamodel",
    "metaworld": "sim",
    "mujoco": "sim",
    "gymnasium": "sim",
    "packaging": "sim",
    "lerobot": "lerobot",
}
# the extras a cluster's workers need (the Docker image installs these): MetaWorld rollouts,
# HDF5 ingest, datamodel regressions, image embedding
CLUSTER_EXTRAS = ("sim", "hdf5", "datamodel", "images")


class MissingDependencyError(ImportError):
    """An optional package a stage needs is not installed; the message says which extra has it."""


def install_hint(module: str) -> str:
    extra = EXTRA_OF.get(module.split(".")[0])
    return f"pip install 'distcur[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def require(module: str, what: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is not
        need = f" (needed by {what})" if what else ""
        raise MissingDependencyError(f"the optional package {top!r} is not installed{need}: "
                                     f"{install_hint(module)}") from None
