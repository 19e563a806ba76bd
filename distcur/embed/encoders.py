"""Step encoders: the interface, a registry, and the built-in encoders.

An :class:`Encoder` maps a batch of steps (the step-table columns it names in ``columns``) to
one float32 vector per step. Encoders that learn from the prior (``needs_fit``) are fit once
on a sample of the prior and serialised with ``to_bytes``; the Ray Data embedding actors
rebuild them with ``from_bytes``, so an encoder never travels as a pickled Python object.

Built in:

- ``vae``: BehaviorRetrieval's state-action VAE, embedding ``[mu(s, a), a]`` (latent 14).
- ``state``, ``action``, ``state-action``: the raw vectors (what SR / AR use, and a
  VAE-free embedding for STRAP or IWR).
- ``image-vae``: BehaviorRetrieval's image variant, a convolutional VAE fit on the prior's
  frames (latent 128, KL weight 1e-4), embedding ``[mu(image), a]``; needs no download.
- ``backbone``: a pretrained image backbone (a DINOv2-style ViT, as STRAP uses) loaded from the
  state_dict / TorchScript file or ``transformers`` model the user names, embedding
  ``[features(image), a]`` (:mod:`distcur.embed.backbone`).
- ``image``: an adapter around any :class:`ImageEncoder` of the user's own, named by an import
  path ``"package.module:factory"``, embedding ``[image features, a]``.

Image encoders decode the step table's PNG / JPEG bytes inside ``encode`` (so, in the embed
stage, inside its Ray Data actors, batch by batch) and run their network ``chunk`` frames at a
time; ``to_device`` puts them on the device the stage resolved (``--device``).

Add an encoder with ``@register_encoder("name")`` on an :class:`Encoder` subclass.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from distcur.embed.images import (
    ImageVAEConfig,
    decode_images,
    frames_to_tensor,
    image_vae_from_bytes,
    image_vae_mu,
    image_vae_to_bytes,
    train_image_vae,
)
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
    # most rows the fit sample may hold (None: EmbedConfig.max_fit_rows); image encoders keep their
    # sample's encoded frames in memory, so they cap it
    max_fit_rows: int | None = None

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

    def to_device(self, device) -> Encoder:
        """Run ``fit`` / ``encode`` on torch ``device`` from now on (encoders without a network ignore it)."""
        return self


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


# -- camera frames ---------------------------------------------------------------------------------
def _row_keys(batch: Batch):
    return tuple(batch[c] for c in SAMPLE_KEYS) if all(c in batch for c in SAMPLE_KEYS) else None


def _images(batch: Batch, encoder: str) -> list:
    if "image" not in batch:
        raise ValueError(f"encoder {encoder!r} needs the step column 'image' (camera frames); batch has "
                         f"{sorted(batch)}; ingest the source with its camera (e.g. --image-keys / --image-size)")
    return list(batch["image"])


def _with_action(feats: np.ndarray, batch: Batch, include_action: bool, encoder: str) -> np.ndarray:
    if not include_action:
        return feats
    return np.concatenate([feats, _float_column(batch, "action", encoder)], axis=1)


@register_encoder("image-vae")
class ImageVAEEncoder(Encoder):
    """BehaviorRetrieval's image variant: ``[mu(image), a]`` from a convolutional VAE fit on the
    prior's frames (:class:`~distcur.embed.images.ConvVAE`; latent 128, KL weight 1e-4).

    ``fit_rows`` caps the fit sample (its encoded frames are held in memory, decoded at
    ``image_size``); ``chunk`` frames are decoded and encoded at a time."""

    columns = ("image", "action")
    needs_fit = True

    def __init__(self, include_action: bool = True, fit_rows: int = 20_000, chunk: int = 256, **vae_options: Any):
        self.vae_config = ImageVAEConfig(**vae_options)
        self.include_action, self.chunk = bool(include_action), int(chunk)
        if fit_rows < 2 or self.chunk < 1:
            raise ValueError(f"image-vae: fit_rows must be >= 2 and chunk >= 1, got {fit_rows}, {chunk}")
        self.max_fit_rows = int(fit_rows)
        self.model = None
        self.device = "cpu"
        self._action_dim: int | None = None

    @property
    def dim(self) -> int:
        if self.model is None:
            raise ValueError("the 'image-vae' encoder has no dimension before fit()")
        if self.include_action and self._action_dim is None:
            raise ValueError("the 'image-vae' encoder knows its dimension after its first batch")
        return self.vae_config.latent_dim + (self._action_dim or 0)

    def to_device(self, device) -> ImageVAEEncoder:
        self.device = device
        if self.model is not None:
            self.model.to(device)
        return self

    def fit(self, sample: Batch) -> dict:
        frames = decode_images(_images(sample, self.name), self.vae_config.image_size, _row_keys(sample))
        self.model, history = train_image_vae(frames, self.vae_config, self.device)
        self.model.to(self.device)
        last = {f"final_{k}": v[-1] if v else None for k, v in history.items()}  # None: train_steps 0
        return {"rows": len(frames), **last, "device": str(self.device)}

    def encode(self, batch: Batch) -> np.ndarray:
        if self.model is None:
            raise ValueError("the 'image-vae' encoder must be fit (or loaded with from_bytes) before encode()")
        images, keys = _images(batch, self.name), _row_keys(batch)
        out = []
        for i in range(0, len(images), self.chunk):
            sub = None if keys is None else tuple(k[i:i + self.chunk] for k in keys)
            out.append(image_vae_mu(self.model, decode_images(images[i:i + self.chunk], self.vae_config.image_size,
                                                              sub), self.chunk))
        feats = np.concatenate(out) if out else np.zeros((0, self.vae_config.latent_dim), np.float32)
        z = _with_action(feats, batch, self.include_action, self.name)
        self._action_dim = z.shape[1] - feats.shape[1]
        return z

    def to_bytes(self) -> bytes:
        if self.model is None:
            raise ValueError("cannot serialise an unfitted 'image-vae' encoder")
        return json.dumps({k: v for k, v in self.config().items() if k in ("include_action", "fit_rows", "chunk")}
                          ).encode() + b"\n" + image_vae_to_bytes(self.model)

    @classmethod
    def from_bytes(cls, blob: bytes) -> ImageVAEEncoder:
        head, _, weights = blob.partition(b"\n")
        try:
            options = json.loads(head.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("image-vae encoder file: damaged header; refit it with `distcur embed --force`") from None
        model = image_vae_from_bytes(weights)
        cfg = dict(model.config.__dict__)
        enc = cls(**options, **cfg)
        enc.model = model
        return enc

    def config(self) -> dict:
        cfg = dict(self.vae_config.__dict__)
        cfg["channels"] = list(cfg["channels"])
        return {**cfg, "include_action": self.include_action, "fit_rows": self.max_fit_rows, "chunk": self.chunk}


@register_encoder("backbone")
class BackboneEncoder(Encoder):
    """``[features(image), a]`` from a pretrained backbone (DINOv2-style ViT, as STRAP uses).

    ``weights``: a local state_dict or TorchScript file, a ``transformers`` model folder or hub
    id (:func:`distcur.embed.backbone.load_backbone`). Frames are resized to ``image_size``
    (a multiple of the ViT's patch), scaled to [0, 1] and ImageNet-normalised (``mean`` /
    ``std``); ``pool`` takes the CLS token or the mean patch token; ``heads`` overrides the
    ViT's head count (default width // 64). ``name`` names the output ``embeddings/backbone-<name>/``
    (default: the weights' file or model name)."""

    columns = ("image", "action")
    needs_fit = False

    def __init__(self, weights: str, name: str | None = None, image_size: int = 224, pool: str = "cls",
                 heads: int | None = None, include_action: bool = True, chunk: int = 64,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 weights_sha256: str | None = None, _payload: tuple[str, bytes] | None = None):
        from distcur.embed import backbone as bb

        if not isinstance(weights, str) or not weights:
            raise ValueError(f"backbone: weights must be a file, folder or hub id, got {weights!r}")
        self.weights, self.image_size, self.pool, self.heads = weights, int(image_size), pool, heads
        self.include_action, self.chunk = bool(include_action), int(chunk)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"backbone: mean and std must be 3 numbers (std > 0), got {mean}, {std}")
        stem = os.path.basename(weights.rstrip("/")).split(".")[0]
        self.label = re.sub(r"[^A-Za-z0-9_-]+", "-", name or stem) or "model"
        if _payload is None or _payload[0] == "transformers":  # a transformers model loads from `weights` itself
            self.backbone = bb.load_backbone(weights, pool, heads)
        else:
            self.backbone = bb.backbone_from_payload(_payload[0], _payload[1], pool, heads, origin=weights)
        # a file's content hash: in the fingerprint (new weights at the same path re-embed), and a pin when given
        self.sha256 = hashlib.sha256(self.backbone.payload).hexdigest() if self.backbone.payload else None
        if weights_sha256 is not None and weights_sha256 != self.sha256:
            raise ValueError(f"backbone weights {weights!r} have sha256 {self.sha256}, not the weights_sha256 "
                             f"{weights_sha256} given")
        self._feat_dim: int | None = None
        self._action_dim: int | None = None

    @property
    def out_name(self) -> str:
        return f"backbone-{self.label}"

    @property
    def dim(self) -> int:
        if self._feat_dim is None or (self.include_action and self._action_dim is None):
            raise ValueError("the 'backbone' encoder knows its dimension after its first batch")
        return self._feat_dim + (self._action_dim or 0)

    def to_device(self, device) -> BackboneEncoder:
        import torch

        self.backbone.to(torch.device(device))
        return self

    def embed_frames(self, frames: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 -> (n, d) float32 features."""
        from distcur.embed.backbone import normalize_frames

        x = normalize_frames(frames_to_tensor(frames, self.backbone.device), self.mean, self.std)
        feats = self.backbone.features(x).cpu().numpy().astype(np.float32)
        if feats.ndim != 2 or len(feats) != len(frames):
            raise ValueError(f"backbone {self.weights}: features of {len(frames)} frames have shape {feats.shape}")
        return feats

    def encode(self, batch: Batch) -> np.ndarray:
        images, keys = _images(batch, self.name), _row_keys(batch)
        out = []
        for i in range(0, len(images), self.chunk):
            sub = None if keys is None else tuple(k[i:i + self.chunk] for k in keys)
            out.append(self.embed_frames(decode_images(images[i:i + self.chunk], self.image_size, sub)))
        if not out:
            raise ValueError("the 'backbone' encoder got an empty batch")
        feats = np.concatenate(out)
        self._feat_dim = feats.shape[1]
        z = _with_action(feats, batch, self.include_action, self.name)
        self._action_dim = z.shape[1] - feats.shape[1]
        return z

    def to_bytes(self) -> bytes:
        from distcur.embed.backbone import pack

        return pack({"options": self.config(), "kind": self.backbone.kind}, self.backbone.payload)

    @classmethod
    def from_bytes(cls, blob: bytes) -> BackboneEncoder:
        from distcur.embed.backbone import unpack

        header, payload = unpack(blob, "backbone encoder file")
        return cls(**header["options"], _payload=(header["kind"], payload))

    def config(self) -> dict:
        return {"weights": self.weights, "name": self.label, "image_size": self.image_size, "pool": self.pool,
                "heads": self.heads, "include_action": self.include_action, "chunk": self.chunk,
                "mean": list(self.mean), "std": list(self.std), "weights_sha256": self.sha256}
