"""Pretrained image backbones (STRAP embeds frames with DINOv2): a DINOv2-style ViT and its loaders.

distcur ships no weights and never downloads any by itself; the user names them with
``weights``, which is one of

- a local **state_dict** file (``torch.save``), in the key layout of facebookresearch/dinov2's
  ViTs (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv,
  attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``; optional
  ``register_tokens``), e.g. ``dinov2_vits14_pretrain.pth``; the architecture (width, depth,
  patch, registers) is read from the tensors' shapes, the head count is ``width // 64`` unless
  given (DINOv2's ViT-S/B/L/g all use 64-dim heads);
- a local **TorchScript** file (``torch.jit.save``): any module mapping (n, 3, S, S) ImageNet-
  normalised frames to (n, d) features, or (n, tokens, d) tokens (pooled as ``pool`` says);
- a ``transformers`` model: a local folder with ``config.json`` or a hub id (``facebook/dinov2-small``),
  loaded with ``AutoModel.from_pretrained`` (the ``hub`` extra; a hub id is fetched by
  ``transformers`` itself, the user's explicit choice).

The state_dict and TorchScript kinds are read once, on the driver, and travel inside the fitted
encoder's bytes in the store, so every embedding actor on every node rebuilds the same model
without needing the file; a ``transformers`` model is loaded by each actor from ``weights``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from distcur.torchio import UnreadableFileError, torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("state_dict", "torchscript", "transformers")
POOLS = ("cls", "mean")


# -- a DINOv2-style ViT ----------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, layerscale: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim, mlp_hidden)
        self.ls1 = _LayerScale(dim) if layerscale else nn.Identity()
        self.ls2 = _LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2's ViT: patch tokens + a CLS token (+ register tokens), learned position embeddings
    (bicubically resized to the input's patch grid), pre-norm blocks with LayerScale, a final norm.
    ``forward`` returns the normed tokens ``(n, 1 + registers + patches, dim)``."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int | None = None, patch: int = 14, grid: int = 37,
                 mlp_hidden: int | None = None, registers: int = 0, layerscale: bool = True):
        super().__init__()
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"DinoViT: width {dim} is not divisible by {heads} heads")
        self.arch = {"dim": dim, "depth": depth, "heads": heads, "patch": patch, "grid": grid,
                     "mlp_hidden": mlp_hidden or 4 * dim, "registers": registers, "layerscale": layerscale}
        self.patch, self.registers = patch, registers
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; in DINOv2's state_dicts
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_hidden or 4 * dim, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(math.isqrt(patch_pos.shape[1]))
        if (h, w) == (g, g):
            return self.pos_embed
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(patch_pos.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, hh, ww = x.shape
        if hh % self.patch or ww % self.patch:
            raise ValueError(f"DinoViT: input {hh}x{ww} is not a multiple of the patch size {self.patch}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1) + self._pos(hh // self.patch,
                                                                                          ww // self.patch)
        if self.registers:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(n, -1, -1), tokens[:, 1:]], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)


def vit_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None, origin: str = "state_dict") -> DinoViT:
    """A :class:`DinoViT` with the architecture the tensors' shapes give, loaded with them (strictly)."""
    sd = {re.sub(r"^(module\.|backbone\.)", "", k): v for k, v in sd.items()}
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{origin}: not a DINOv2-style ViT state_dict (missing {missing}; it has "
                         f"{sorted(sd)[:8]}...)")
    if any(".mlp.w12." in k for k in sd):
        raise ValueError(f"{origin}: SwiGLU blocks (DINOv2 ViT-g) are not supported; export the model with "
                         "torch.jit.save and pass that file instead")
    dim = int(sd["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_patch = int(sd["pos_embed"].shape[1]) - 1
    grid = int(math.isqrt(n_patch))
    if grid * grid != n_patch:
        raise ValueError(f"{origin}: pos_embed has {n_patch} patch positions, not a square grid")
    model = DinoViT(dim=dim, depth=depth, heads=heads, patch=int(sd["patch_embed.proj.weight"].shape[-1]),
                    grid=grid, mlp_hidden=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
                    registers=int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
                    layerscale="blocks.0.ls1.gamma" in sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{origin}: does not load into a DINOv2-style ViT: {str(e).splitlines()[0]}") from None
    return model.eval()


# -- loading what the user names -------------------------------------------------------------------
def weights_kind(weights: str) -> str:
    """``torchscript`` / ``state_dict`` for a local file, ``transformers`` for a folder with config.json
    or anything that is not a local path (a hub id)."""
    if os.path.isdir(weights):
        if os.path.exists(os.path.join(weights, "config.json")):
            return "transformers"
        raise ValueError(f"backbone weights {weights!r}: a folder without config.json (expected a transformers "
                         "model folder, or pass a state_dict / TorchScript file)")
    if os.path.isfile(weights):
        try:
            with zipfile.ZipFile(weights) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "state_dict"  # a legacy (non-zip) torch.save file; torch_load says if it is not one
        return "torchscript" if any("/code/" in n or n.endswith("constants.pkl") for n in names) else "state_dict"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", weights) and not weights.startswith((".", "/")):
        return "transformers"
    raise FileNotFoundError(f"backbone weights {weights!r}: no such file or folder, and not a hub id (owner/name)")


class Backbone:
    """A loaded backbone: ``features(x)`` maps (n, 3, S, S) ImageNet-normalised frames to (n, dim)."""

    def __init__(self, kind: str, module: nn.Module | torch.jit.ScriptModule, pool: str, payload: bytes = b""):
        if pool not in POOLS:
            raise ValueError(f"backbone pool must be one of {POOLS}, got {pool!r}")
        self.kind, self.module, self.pool, self.payload = kind, module, pool, payload
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> Backbone:
        self.module = self.module.to(device)
        self.device = device
        return self

    def _pool(self, out) -> torch.Tensor:
        if self.kind == "transformers":  # a BaseModelOutput(WithPooling)
            pooled = getattr(out, "pooler_output", None)
            if self.pool == "cls":
                return pooled if pooled is not None else out.last_hidden_state[:, 0]
            return out.last_hidden_state[:, 1:].mean(1)
        if isinstance(out, dict):  # DINOv2's forward_features dict
            key = "x_norm_clstoken" if self.pool == "cls" else "x_norm_patchtokens"
            if key not in out:
                raise ValueError(f"backbone returned a dict without {key!r} (keys {sorted(out)})")
            out = out[key]
            return out if out.ndim == 2 else out.mean(1)
        if out.ndim == 2:
            return out
        if out.ndim == 3:  # tokens: CLS first, then registers (ours), then patches
            skip = 1 + int(getattr(self.module, "registers", 0) or 0)
            return out[:, 0] if self.pool == "cls" else out[:, skip:].mean(1)
        raise ValueError(f"backbone output has shape {tuple(out.shape)}; expected (n, d) or (n, tokens, d)")

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(pixel_values=x) if self.kind == "transformers" else self.module(x)
        return self._pool(out).float()


def load_backbone(weights: str, pool: str = "cls", heads: int | None = None) -> Backbone:
    """Load ``weights`` (see the module docstring) as a :class:`Backbone` in eval mode on the CPU."""
    kind = weights_kind(weights)
    if kind == "transformers":
        from distcur.deps import require

        transformers = require("transformers", "the 'backbone' encoder with a transformers model")
        try:
            model = transformers.AutoModel.from_pretrained(weights)
        except (OSError, ValueError) as e:
            raise ValueError(f"backbone weights {weights!r}: transformers cannot load it: {e}") from None
        return Backbone(kind, model.eval(), pool)
    with open(weights, "rb") as f:
        payload = f.read()
    return backbone_from_payload(kind, payload, pool, heads, origin=weights)


def backbone_from_payload(kind: str, payload: bytes, pool: str, heads: int | None, origin: str) -> Backbone:
    """Rebuild a state_dict / TorchScript backbone from the file's bytes."""
    if kind == "torchscript":
        try:
            module = torch.jit.load(io.BytesIO(payload), map_location="cpu")
        except RuntimeError as e:
            raise UnreadableFileError(f"{origin}: not a loadable TorchScript file ({str(e).splitlines()[0]})") from None
        return Backbone(kind, module.eval(), pool, payload)
    sd = torch_load(payload, origin, "pass a torch.save'd state_dict of a DINOv2-style ViT, or a TorchScript file")
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{origin}: expected a state_dict (names -> tensors), got {type(sd).__name__}")
    return Backbone(kind, vit_from_state_dict(sd, heads, origin), pool, payload)


def normalize_frames(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(n, 3, S, S) in [0, 1] -> ImageNet-normalised."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# -- the fitted encoder's bytes: a JSON header and the weights file ---------------------------------
_MAGIC = b"DCBB1"


def pack(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return _MAGIC + struct.pack("<Q", len(head)) + head + payload


def unpack(blob: bytes, origin: str) -> tuple[dict, bytes]:
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 8:
        raise UnreadableFileError(f"{origin}: not a distcur backbone encoder file; refit it with `distcur embed --force`")
    n = struct.unpack("<Q", blob[len(_MAGIC):len(_MAGIC) + 8])[0]
    start = len(_MAGIC) + 8
    try:
        header = json.loads(blob[start:start + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnreadableFileError(f"{origin}: damaged header; refit it with `distcur embed --force`") from None
    return header, blob[start + n:]

