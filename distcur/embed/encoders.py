"""Step encoders: the interface, a registry, and the built-in encoders.

An :class:`Encoder` maps a batch of steps (the step-table columns it names in ``columns``) to
one float32 vector per step. Encoders that learn from the prior (``needs_fit``) are fit once
on a sample of the prior and serialised with ``to_bytes``; the Ray Data embedding actors
rebuild them with ``from_bytes``, so an encoder never travels as a pickled Python object.

Built in:

- ``vae``: BehaviorRetrieval's state-action VAE, embedding ``[mu(s, a), a]`` (latent 14).
- ``state``, ``action``, ``state-action``: the raw vectors (what SR / AR use, and a
  VAE-free embedding for STRAP or IWR).
- ``image``: an adapter around any :class:`ImageEncoder` (e.g. DINOv2 where its weights are
  available locally), embedding ``[image features, a]``. distcur ships no weights and
  downloads none: the image encoder is named by an import path ``"package.module:factory"``.

Add an encoder with ``@register_encoder("name")`` on an :class:`Encoder` subclass.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from distcur.embed.vae import VAEConfig, train_vae, vae_embed, vae_from_bytes, vae_to_bytes

# The embed stage's fit sample also carries each row's keys, so a fit can name a bad step.
SAMPLE_KEYS = ("source", "episode", "step")

Batch = dict[str, np.ndarray]  # step columns: state/action (n, d) float32; image (n,) object of bytes


class Encoder(ABC):
    """Maps a batch of steps to embeddings.

    Subclasses set ``columns`` (the step columns read), ``needs_fit``, and implement ``dim``,
    ``encode``, ``to_bytes`` / ``from_bytes`` and, if ``needs_fit``, ``fit``.
    """

    name: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ("state", "action")
    needs_fit: ClassVar[bool] = False

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding dimension (known after ``fit`` for fitted encoders)."""

    @abstractmethod
    def encode(self, batch: Batch) -> np.ndarray:
        """(n, dim) float32 embeddings of the n steps in ``batch``."""

    def fit(self, sample: Batch) -> dict:
        """Learn from a sample of prior steps (``columns`` and, from the embed stage, :data:`SAMPLE_KEYS`);
        returns a JSON-able training summary."""
        return {}

    @property
    def out_name(self) -> str:
        """Name of the output folder ``embeddings/<out_name>/`` (the registry name by default)."""
        return self.name

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Everything needed to rebuild the (fitted) encoder elsewhere."""

    @classmethod
    @abstractmethod
    def from_bytes(cls, blob: bytes) -> Encoder:
        """Inverse of ``to_bytes``."""

    def config(self) -> dict:
        """JSON-able options, for manifests and fingerprints."""
        return {}


_REGISTRY: dict[str, type[Encoder]] = {}


def register_encoder(name: str):
    """Class decorator: make ``cls`` available as ``build_encoder(name)``."""

    def deco(cls: type[Encoder]) -> type[Encoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoder {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def encoder_class(name: str) -> type[Encoder]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; available: {available_encoders()}") from None


def build_encoder(name: str, options: dict | None = None) -> Encoder:
    """A new (unfitted) encoder of registry ``name`` with constructor ``options``."""
    cls = encoder_class(name)
    try:
        return cls(**(options or {}))
    except TypeError as e:
        raise ValueError(f"bad options {options} for encoder {name!r}: {e}") from e


def encoder_from_bytes(name: str, blob: bytes) -> Encoder:
    return encoder_class(name).from_bytes(blob)


def _float_column(batch: Batch, column: str, encoder: str) -> np.ndarray:
    if column not in batch:
        raise ValueError(f"encoder {encoder!r} needs step column {column!r}; batch has {sorted(batch)}")
    arr = np.asarray(batch[column], np.float32)
    if arr.ndim != 2:
        raise ValueError(f"encoder {encoder!r}: column {column!r} must be (n, dim), got shape {arr.shape}")
    return arr


# -- state-action VAE ------------------------------------------------------------------------------
@register_encoder("vae")
class VAEEncoder(Encoder):
    """BehaviorRetrieval: ``[mu(s, a), a]`` from a state-action VAE fit on the prior."""

    columns = ("state", "action")
    needs_fit = True

    def __init__(self, **vae_options: Any):
        self.vae_config = VAEConfig(**vae_options)
        self.model = None
        self.history: dict = {}

    @property
    def dim(self) -> int:
        if self.model is None:
            raise ValueError("the 'vae' encoder has no dimension before fit()")
        return self.vae_config.latent_dim + self.model.action_dim

    def fit(self, sample: Batch) -> dict:
        state = _float_column(sample, "state", self.name)
        action = _float_column(sample, "action", self.name)
        keys = tuple(sample[c] for c in SAMPLE_KEYS) if all(c in sample for c in SAMPLE_KEYS) else None
        self.model, self.history = train_vae(state, action, self.vae_config, keys)
        return {"rows": len(state), "final_loss": self.history["loss"][-1],
                "final_recon": self.history["recon"][-1], "final_kl": self.history["kl"][-1]}

    def encode(self, batch: Batch) -> np.ndarray:
        if self.model is None:
            raise ValueError("the 'vae' encoder must be fit (or loaded with from_bytes) before encode()")
        return vae_embed(self.model, _float_column(batch, "state", self.name), _float_column(batch, "action", self.name))

    def to_bytes(self) -> bytes:
        if self.model is None:
            raise ValueError("cannot serialise an unfitted 'vae' encoder")
        return vae_to_bytes(self.model)

    @classmethod
    def from_bytes(cls, blob: bytes) -> VAEEncoder:
        model = vae_from_bytes(blob)
        enc = cls(**{k: v for k, v in model.config.__dict__.items()})
        enc.model = model
        return enc

    def config(self) -> dict:
        cfg = dict(self.vae_config.__dict__)
        cfg["hidden"] = list(cfg["hidden"])
        return cfg


# -- raw vectors -----------------------------------------------------------------------------------
class _RawEncoder(Encoder):
    """The concatenation of raw step columns; nothing to fit."""

    def __init__(self) -> None:
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise ValueError(f"the {self.name!r} encoder knows its dimension after its first batch")
        return self._dim

    def encode(self, batch: Batch) -> np.ndarray:
        z = np.concatenate([_float_column(batch, c, self.name) for c in self.columns], axis=1)
        self._dim = z.shape[1]
        return z

    def to_bytes(self) -> bytes:
        return b"{}"

    @classmethod
    def from_bytes(cls, blob: bytes) -> Encoder:
        return cls()


@register_encoder("state")
class StateEncoder(_RawEncoder):
    columns = ("state",)


@register_encoder("action")
class ActionEncoder(_RawEncoder):
    columns = ("action",)


@register_encoder("state-action")
class StateActionEncoder(_RawEncoder):
    columns = ("state", "action")


# -- images ----------------------------------------------------------------------------------------
@runtime_checkable
class ImageEncoder(Protocol):
    """A pretrained image feature extractor that :class:`ImageActionEncoder` can drive.

    Implement it in your own module with a factory ``make(**kwargs) -> ImageEncoder`` that loads
    weights from a local path (distcur never downloads any), e.g. DINOv2 via ``torch.hub.load``
    with ``source="local"``. Contract:

    - ``name``: short identifier, used in the output folder ``embeddings/image-<name>/``;
    - ``dim``: feature dimension;
    - ``embed_images(images)``: ``images`` is a sequence of n encoded images (PNG/JPEG bytes, the
      step table's ``image`` column); returns an (n, dim) float32 array, deterministic (eval
      mode), one row per image in order. It runs inside a Ray Data actor, once per batch; put
      the model on the GPU there if one is available.
    """

    name: str
    dim: int

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray: ...


def _load_factory(path: str):
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"image encoder factory must be 'package.module:callable', got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import image encoder factory {path!r}: {e}") from e


@register_encoder("image")
class ImageActionEncoder(Encoder):
    """``[f(image), a]`` where ``f`` is an :class:`ImageEncoder` built by ``factory(**factory_kwargs)``."""

    columns = ("image", "action")
    needs_fit = False

    def __init__(self, factory: str, factory_kwargs: dict | None = None, include_action: bool = True):
        self.factory, self.factory_kwargs = factory, dict(factory_kwargs or {})
        self.include_action = bool(include_action)
        image_encoder = _load_factory(factory)(**self.factory_kwargs)
        if not isinstance(image_encoder, ImageEncoder):
            raise ValueError(f"{factory} returned {type(image_encoder).__name__}, which lacks name/dim/embed_images")
        self.image_encoder = image_encoder
        self._action_dim: int | None = None

    @property
    def out_name(self) -> str:
        return f"image-{self.image_encoder.name}"

    @property
    def dim(self) -> int:
        if self.include_action and self._action_dim is None:
            raise ValueError("the 'image' encoder knows its dimension after its first batch")
        return int(self.image_encoder.dim) + (self._action_dim or 0)

    def encode(self, batch: Batch) -> np.ndarray:
        if "image" not in batch:
            raise ValueError("the 'image' encoder needs the step column 'image'")
        images = list(batch["image"])
        missing = [i for i, im in enumerate(images) if im is None]
        if missing:
            raise ValueError(f"the 'image' encoder got null images at batch rows {missing[:5]}")
        feats = np.asarray(self.image_encoder.embed_images(images), np.float32)
        if feats.shape != (len(images), int(self.image_encoder.dim)):
            raise ValueError(f"{self.factory}: embed_images returned {feats.shape}, "
                             f"expected ({len(images)}, {self.image_encoder.dim})")
        if not self.include_action:
            return feats
        action = _float_column(batch, "action", self.name)
        self._action_dim = action.shape[1]
        return np.concatenate([feats, action], axis=1)

    def to_bytes(self) -> bytes:
        return json.dumps(self.config()).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> ImageActionEncoder:
        return cls(**json.loads(blob.decode()))

    def config(self) -> dict:
        return {"factory": self.factory, "factory_kwargs": self.factory_kwargs, "include_action": self.include_action}
