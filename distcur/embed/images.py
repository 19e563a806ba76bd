"""Camera frames: decoding the step table's ``image`` bytes, and BehaviorRetrieval's image VAE.

- :func:`decode_images`: PNG / JPEG bytes -> (n, H, W, 3) uint8, resized to a square size
  (Pillow, the ``images`` extra). It runs wherever an encoder's ``encode`` runs: inside the
  embed stage's Ray Data actors, one batch at a time, so no process holds a prior's frames.
- :class:`ConvVAE`: a convolutional VAE on frames scaled to [0, 1]; q(z | image) is a
  diagonal Gaussian over a latent of 128 dims, training minimises pixel MSE +
  ``kl_weight`` * KL with ``kl_weight = 1e-4`` (BehaviorRetrieval's image variant). The
  retrieval embedding of a step is ``[mu(image), a]`` (:func:`image_vae_embed`), as the
  state-action VAE's is ``[mu(s, a), a]``.

Everything here is plain torch / numpy; the encoders in :mod:`distcur.embed.encoders` drive it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from distcur.embed.vae import VAETraining, fit_loop
from distcur.schema import RowKeys, describe_row
from distcur.torchio import torch_load


class ImageDecodeError(ValueError):
    """An ``image`` cell that is not a decodable PNG / JPEG frame; the message names the step."""


def decode_images(images: Sequence[bytes | None], size: int | None = None, keys: RowKeys | None = None) -> np.ndarray:
    """Decode encoded frames to an (n, size, size, 3) uint8 array (RGB).

    ``size`` resizes every frame to ``size x size`` (bilinear; None keeps the frames' own size,
    which must then agree). ``keys``: the rows' (source, episode, step), named in errors.
    """
    from distcur.deps import require

    Image = require("PIL.Image", "decoding camera frames")
    out: np.ndarray | None = None
    for i, blob in enumerate(images):
        if blob is None:
            raise ImageDecodeError(f"null image at {describe_row(i, keys)}")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                frame = np.asarray(im, np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for bytes that are not an image
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # Pillow names the buffer
            raise ImageDecodeError(f"image at {describe_row(i, keys)} is not a decodable PNG/JPEG frame "
                                   f"({len(blob)} bytes, {type(e).__name__}: {reason})") from None
        if out is None:
            out = np.empty((len(images), *frame.shape), np.uint8)
        elif frame.shape != out.shape[1:]:
            raise ImageDecodeError(f"image at {describe_row(i, keys)} is {frame.shape[1]}x{frame.shape[0]}, earlier "
                                   f"frames are {out.shape[2]}x{out.shape[1]}; give a size to resize them")
        out[i] = frame
    return out if out is not None else np.zeros((0, size or 0, size or 0, 3), np.uint8)


def frames_to_tensor(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


# -- the convolutional VAE -------------------------------------------------------------------------
@dataclass
class ImageVAEConfig(VAETraining):
    """Architecture and training of :class:`ConvVAE` (BehaviorRetrieval's image variant: latent 128,
    KL weight 1e-4). ``image_size`` must be divisible by ``2 ** len(channels)`` (each conv halves it)."""

    latent_dim: int = 128
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 256)
    batch_size: int = 64
    train_steps: int = 2000

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.check("channels", "channel counts")
        if self.image_size < 1 or self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"ImageVAEConfig.image_size must be a positive multiple of 2**len(channels) = "
                             f"{2 ** len(self.channels)}, got {self.image_size}")


class ConvVAE(nn.Module):
    """q(z | x) = N(mu, diag(exp(logvar))) from strided convolutions; p(x | z) = N(decoder(z), I)
    through transposed convolutions; x is a frame scaled to [0, 1]."""

    def __init__(self, config: ImageVAEConfig | None = None):
        super().__init__()
        self.config = config or ImageVAEConfig()
        ch = list(self.config.channels)
        self.grid = self.config.image_size // 2 ** len(ch)
        enc: list[nn.Module] = []
        c_in = 3
        for c in ch:
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = ch[-1] * self.grid * self.grid
        self.to_stats = nn.Linear(flat, 2 * self.config.latent_dim)
        self.from_latent = nn.Linear(self.config.latent_dim, flat)
        dec: list[nn.Module] = []
        rev = list(reversed(ch))
        for i, c in enumerate(rev):
            c_out = rev[i + 1] if i + 1 < len(rev) else 3
            dec.append(nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1))
            if i + 1 < len(rev):
                dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec, nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(len(z), self.config.channels[-1], self.grid, self.grid)
        return self.decoder(h)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """ELBO terms on a batch of frames in [0, 1]: pixel MSE (mean), KL (mean over batch), total."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)  # a CPU generator: the
        # same noise on every device
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = ((self.decode(z) - x) ** 2).mean()
        kl = (-0.5 * (1.0 + logvar - mu**2 - logvar.exp()).sum(-1)).mean()
        return {"loss": recon + self.config.kl_weight * kl, "recon": recon, "kl": kl}


def train_image_vae(frames: np.ndarray, config: ImageVAEConfig | None = None, device: torch.device | str = "cpu",
                    ) -> tuple[ConvVAE, dict]:
    """Fit a :class:`ConvVAE` on decoded frames ``(n, S, S, 3)`` uint8 (S = ``config.image_size``, n >= 2).

    The frames stay uint8 on the host; each batch is scaled to [0, 1] on ``device``. Returns
    (model on CPU in eval mode, history {"loss", "recon", "kl"} every 50 steps)."""
    config = config or ImageVAEConfig()
    s = config.image_size
    if frames.ndim != 4 or frames.shape[1:] != (s, s, 3) or frames.dtype != np.uint8:
        raise ValueError(f"train_image_vae: expected uint8 frames (n, {s}, {s}, 3), got {frames.dtype} {frames.shape}")
    if len(frames) < 2:
        raise ValueError(f"train_image_vae: need at least 2 frames to fit the VAE, got {len(frames)}")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = ConvVAE(config).to(device)
    history = fit_loop(model, config, len(frames),
                       lambda idx: model.loss(frames_to_tensor(frames[np.sort(idx.numpy())], device), generator=gen),
                       gen, "image VAE fit")
    return model.cpu(), history


@torch.no_grad()
def image_vae_mu(model: ConvVAE, frames: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Posterior means ``mu(image)`` of decoded frames, (n, latent_dim) float32, ``chunk`` frames at a time
    on the model's device."""
    s = model.config.image_size
    if frames.ndim != 4 or frames.shape[1:] != (s, s, 3):
        raise ValueError(f"image_vae_mu: the VAE was fit on {s}x{s} RGB frames, got {frames.shape}")
    device = next(model.parameters()).device
    out = [model.encode(frames_to_tensor(frames[i:i + chunk], device))[0].float().cpu().numpy()
           for i in range(0, len(frames), chunk)]
    return np.concatenate(out) if out else np.zeros((0, model.config.latent_dim), np.float32)


def image_vae_to_bytes(model: ConvVAE) -> bytes:
    """Weights and config (loadable with ``weights_only=True``)."""
    buf = io.BytesIO()
    cfg = asdict(model.config)
    cfg["channels"] = list(cfg["channels"])
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": cfg}, buf)
    return buf.getvalue()


def image_vae_from_bytes(blob: bytes, origin: str = "image VAE encoder") -> ConvVAE:
    d = torch_load(blob, origin, "refit it with `distcur embed --force`")
    model = ConvVAE(ImageVAEConfig(**d["config"]))
    model.load_state_dict(d["state_dict"])
    model.eval()
    return model
