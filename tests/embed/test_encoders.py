"""Embedding maths: the VAE trains and round-trips; the encoder registry's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.embed.encoders import available_encoders, build_encoder
from distcur.embed.vae import VAEConfig, train_vae, vae_embed, vae_from_bytes, vae_to_bytes


def test_vae_trains_and_round_trips():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(2000, 3))
    state = (latent @ rng.normal(size=(3, 10))).astype(np.float32)
    action = (latent @ rng.normal(size=(3, 4))).astype(np.float32)
    torch.set_num_threads(1)  # a tiny MLP: threads only contend on a shared 2-core machine
    model, hist = train_vae(state, action, VAEConfig(train_steps=120, hidden=(32, 32), batch_size=64, lr=3e-3))
    assert hist["recon"][-1] < 0.7 * hist["recon"][0]
    z = vae_embed(model, state[:7], action[:7])
    assert z.shape == (7, 14 + 4) and np.array_equal(z[:, 14:], action[:7])
    np.testing.assert_array_equal(vae_embed(vae_from_bytes(vae_to_bytes(model)), state[:7], action[:7]), z)
    with pytest.raises(ValueError, match="state dim 10"):
        vae_embed(model, state[:3, :9], action[:3])
    with pytest.raises(ValueError, match="at least 2 steps"):
        train_vae(state[:1], action[:1])


def test_registry_and_config_errors():
    assert {"vae", "state", "action", "state-action", "image"} <= set(available_encoders())
    with pytest.raises(ValueError, match="unknown encoder 'dino'"):
        build_encoder("dino")
    with pytest.raises(ValueError, match="bad options"):
        build_encoder("vae", {"latent": 3})
    with pytest.raises(ValueError, match="package.module:callable"):
        build_encoder("image", {"factory": "no_colon"})
    with pytest.raises(ValueError, match="must be fit"):
        build_encoder("vae").encode({"state": np.zeros((1, 2)), "action": np.zeros((1, 1))})
