"""BehaviorRetrieval's state-action VAE, in plain torch.

The VAE encodes a normalised (state, action) pair into a diagonal Gaussian over a latent of
14 dims (low-dimensional state; BehaviorRetrieval uses 128 for images) and decodes it back;
training minimises reconstruction MSE + ``kl_weight`` * KL(q(z|s,a) || N(0, I)) with
``kl_weight = 1e-4``. The retrieval embedding of a step is ``[mu(s, a), a]`` (the posterior
mean and the raw action), see :func:`vae_embed`.

Inputs are standardised with per-dimension mean/std stored in the model as buffers; a
dimension with zero spread (a constant state dim, e.g. an unused slot) is divided by 1,
so it contributes nothing instead of producing NaNs.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from distcur.progress import bar
from distcur.schema import RowKeys, describe_row
from distcur.torchio import torch_load


@dataclass
class VAETraining:
    """What every VAE of distcur shares: the KL weight (1e-4, BehaviorRetrieval's), Adam's rate, the seed."""

    kl_weight: float = 1e-4
    lr: float = 1e-3
    seed: int = 0

    def check(self, widths: str, what: str) -> None:
        """Checks of the latent, the layer ``widths`` (a tuple field), the KL weight, the batch and steps."""
        name = type(self).__name__
        if self.latent_dim < 1:
            raise ValueError(f"{name}.latent_dim must be >= 1, got {self.latent_dim}")
        if not getattr(self, widths) or min(getattr(self, widths)) < 1:
            raise ValueError(f"{name}.{widths} must be positive {what}, got {getattr(self, widths)}")
        if self.kl_weight < 0:
            raise ValueError(f"{name}.kl_weight must be >= 0, got {self.kl_weight}")
        if self.batch_size < 1 or self.train_steps < 0:
            raise ValueError(f"{name}: batch_size >= 1 and train_steps >= 0, got {self.batch_size}, {self.train_steps}")


@dataclass
class VAEConfig(VAETraining):
    """Architecture and training of :class:`StateActionVAE`."""

    latent_dim: int = 14
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 256
    train_steps: int = 3000

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.check("hidden", "layer widths")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StateActionVAE(nn.Module):
    """q(z | s, a) = N(mu, diag(exp(logvar))), p(s, a | z) = N(decoder(z), I) on standardised inputs."""

    def __init__(self, state_dim: int, action_dim: int, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.state_dim, self.action_dim = int(state_dim), int(action_dim)
        d_in = self.state_dim + self.action_dim
        hidden = list(self.config.hidden)
        self.encoder = _mlp([d_in, *hidden, 2 * self.config.latent_dim])
        self.decoder = _mlp([self.config.latent_dim, *reversed(hidden), d_in])
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_std", torch.ones(d_in))

    def set_normalization(self, x: np.ndarray) -> None:
        """Standardisation stats from a sample of concatenated (state, action), (n, ds + da)."""
        mean = x.mean(0)
        std = x.std(0)
        std = np.where(std > 1e-8, std, 1.0)
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def normalize(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return (torch.cat([state, action], dim=-1) - self.input_mean) / self.input_std

    def encode(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x_norm).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def loss(self, state: torch.Tensor, action: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """ELBO terms on a batch: reconstruction MSE (mean over dims), KL (mean over batch), total."""
        x = self.normalize(state, action)
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = ((self.decoder(z) - x) ** 2).mean()
        kl = (-0.5 * (1.0 + logvar - mu**2 - logvar.exp()).sum(-1)).mean()
        return {"loss": recon + self.config.kl_weight * kl, "recon": recon, "kl": kl}


def train_vae(state: np.ndarray, action: np.ndarray, config: VAEConfig | None = None,
              keys: RowKeys | None = None) -> tuple[StateActionVAE, dict]:
    """Fit a VAE on a sample of steps.

    Args:
        state: (n, ds) float array; action: (n, da) float array (n >= 2).
        keys: the sample rows' (source, episode, step), named when a row is not finite.
    Returns:
        (model in eval mode, history {"loss": [...], "recon": [...], "kl": [...]} every 50 steps).
    """
    config = config or VAEConfig()
    state = np.array(state, np.float32)  # writable copies for torch.from_numpy
    action = np.array(action, np.float32)
    if state.ndim != 2 or action.ndim != 2 or len(state) != len(action):
        raise ValueError(f"train_vae: expected state (n, ds) and action (n, da), got {state.shape} and {action.shape}")
    if len(state) < 2:
        raise ValueError(f"train_vae: need at least 2 steps to fit the VAE, got {len(state)}")
    for name, arr in (("state", state), ("action", action)):
        if not np.isfinite(arr).all():
            row = int(np.argmax(~np.isfinite(arr).all(1)))
            raise ValueError(f"train_vae: non-finite {name} at {describe_row(row, keys)}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = StateActionVAE(state.shape[1], action.shape[1], config)
    model.set_normalization(np.concatenate([state, action], 1))
    s_t, a_t = torch.from_numpy(state), torch.from_numpy(action)
    history = fit_loop(model, config, len(s_t), lambda idx: model.loss(s_t[idx], a_t[idx], generator=gen), gen,
                       "VAE fit")
    return model, history


def fit_loop(model: nn.Module, config: VAETraining, n: int, batch_loss, gen: torch.Generator, desc: str) -> dict:
    """Adam on ``batch_loss(idx)`` (the ELBO terms of the rows ``idx``, a batch drawn uniformly with
    replacement from ``n`` rows by ``gen``) for ``config.train_steps`` steps; leaves ``model`` in eval
    mode and returns the history {"loss", "recon", "kl"}, recorded every 50 steps and at the last."""
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: dict[str, list[float]] = {"loss": [], "recon": [], "kl": []}
    model.train()
    with bar(total=config.train_steps, desc=desc, unit="step") as progress:
        for it in range(config.train_steps):
            terms = batch_loss(torch.randint(0, n, (min(config.batch_size, n),), generator=gen))
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            if it % 50 == 0 or it == config.train_steps - 1:
                for k in history:
                    history[k].append(float(terms[k].detach()))
                progress.set_postfix(loss=f"{history['loss'][-1]:.4g}", refresh=False)
            progress.update()
    model.eval()
    return history


@torch.no_grad()
def vae_embed(model: StateActionVAE, state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """BehaviorRetrieval's embedding ``[mu(s, a), a]``, (n, latent_dim + da) float32."""
    state = np.array(state, np.float32)  # a writable copy: Arrow-backed arrays are read-only
    action = np.array(action, np.float32)
    if state.shape[1:] != (model.state_dim,) or action.shape[1:] != (model.action_dim,):
        raise ValueError(
            f"vae_embed: the VAE was fit on state dim {model.state_dim} / action dim {model.action_dim}, "
            f"got state {state.shape} and action {action.shape}"
        )
    mu, _ = model.encode(model.normalize(torch.from_numpy(state), torch.from_numpy(action)))
    return np.concatenate([mu.numpy(), action], axis=1).astype(np.float32)


def vae_to_bytes(model: StateActionVAE) -> bytes:
    """Serialise weights, dims and config (loadable with ``weights_only=True``)."""
    buf = io.BytesIO()
    cfg = asdict(model.config)
    cfg["hidden"] = list(cfg["hidden"])
    torch.save({"state_dict": model.state_dict(), "state_dim": model.state_dim,
                "action_dim": model.action_dim, "config": cfg}, buf)
    return buf.getvalue()


def vae_from_bytes(blob: bytes, origin: str = "VAE encoder") -> StateActionVAE:
    d = torch_load(blob, origin, "refit it with `distcur embed --force`")
    model = StateActionVAE(d["state_dim"], d["action_dim"], VAEConfig(**d["config"]))
    model.load_state_dict(d["state_dict"])
    model.eval()
    return model
