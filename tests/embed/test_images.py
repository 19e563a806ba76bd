"""Camera frames: decoding, the conv VAE (image-vae), the pretrained-backbone adapter, and the embed
stage on an image source through Ray Data (decoding inside its actors)."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch

from distcur.embed import images as im
from distcur.embed.backbone import DinoViT, load_backbone, normalize_frames, weights_kind
from distcur.embed.encoders import available_encoders, build_encoder, encoder_from_bytes
from distcur.sources.common import encode_image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from image_factory import blob_frames  # noqa: E402

PIL = pytest.importorskip("PIL.Image")


def test_decode_png_and_jpeg_resize_and_errors():
    frames, _ = blob_frames(3, 40, 0)
    png = [encode_image(f, "png") for f in frames]
    np.testing.assert_array_equal(im.decode_images(png), frames)  # PNG is lossless
    jpeg = im.decode_images([encode_image(f, "jpeg") for f in frames])
    assert jpeg.shape == frames.shape and np.abs(jpeg.astype(int) - frames).mean() < 8
    small = im.decode_images(png, size=16)
    assert small.shape == (3, 16, 16, 3) and small.dtype == np.uint8
    gray = io.BytesIO()
    PIL.fromarray(frames[0, :, :, 0]).save(gray, format="PNG")  # a one-channel frame becomes RGB
    assert im.decode_images([gray.getvalue()]).shape == (1, 40, 40, 3)
    keys = ("cam", np.array([7, 7, 7]), np.array([0, 1, 2]))
    with pytest.raises(im.ImageDecodeError, match=r"source='cam', episode=7, step=1 is not a decodable PNG/JPEG"):
        im.decode_images([png[0], b"\x89PNG garbage", png[2]], keys=keys)
    with pytest.raises(im.ImageDecodeError, match="null image at row 1"):
        im.decode_images([png[0], None])
    other = encode_image(blob_frames(1, 24, 1)[0][0])
    with pytest.raises(im.ImageDecodeError, match="is 24x24, earlier frames are 40x40; give a size"):
        im.decode_images([png[0], other])
    assert im.decode_images([other, png[0]], size=24).shape == (2, 24, 24, 3)


def test_conv_vae_learns_the_frames_and_round_trips():
    torch.set_num_threads(1)
    frames, pos = blob_frames(600, 32, 0)
    cfg = im.ImageVAEConfig(image_size=32, channels=(8, 16), latent_dim=16, train_steps=150, batch_size=32, lr=3e-3)
    model, hist = im.train_image_vae(frames, cfg)
    assert hist["recon"][-1] < 0.5 * hist["recon"][0]
    mu = im.image_vae_mu(model, frames[:200], chunk=64)
    assert mu.shape == (200, 16) and np.isfinite(mu).all()
    # the latent carries the square's position: a linear read-out predicts it far better than its mean
    x = np.c_[mu, np.ones(len(mu))]
    coef, *_ = np.linalg.lstsq(x, pos[:200], rcond=None)
    r2 = 1 - ((x @ coef - pos[:200]) ** 2).sum() / ((pos[:200] - pos[:200].mean(0)) ** 2).sum()
    assert r2 > 0.6, r2
    np.testing.assert_array_equal(im.image_vae_mu(im.image_vae_from_bytes(im.image_vae_to_bytes(model)), frames[:5]), mu[:5])
    with pytest.raises(ValueError, match="fit on 32x32"):
        im.image_vae_mu(model, frames[:2, :16, :16])
    with pytest.raises(ValueError, match="multiple of 2"):
        im.ImageVAEConfig(image_size=30, channels=(8, 16))
    assert im.ImageVAEConfig().latent_dim == 128 and im.ImageVAEConfig().kl_weight == 1e-4  # BR's image variant


def test_image_vae_encoder_fits_encodes_and_serialises():
    assert {"image-vae", "backbone"} <= set(available_encoders())
    frames, pos = blob_frames(64, 32, 2)
    batch = {"image": np.array([encode_image(f) for f in frames], object),
             "action": np.c_[pos, -pos].astype(np.float32)}
    enc = build_encoder("image-vae", {"image_size": 32, "channels": [8, 16], "latent_dim": 8, "train_steps": 5,
                                      "chunk": 10})
    with pytest.raises(ValueError, match="must be fit"):
        enc.encode(batch)
    summary = enc.fit(batch)
    assert summary["rows"] == 64
    z = enc.encode(batch)
    assert z.shape == (64, 8 + 4) and enc.dim == 12 and np.array_equal(z[:, 8:], batch["action"])
    again = encoder_from_bytes("image-vae", enc.to_bytes())
    np.testing.assert_array_equal(again.encode(batch), z)
    assert again.config() == enc.config()
    with pytest.raises(ValueError, match="needs the step column 'image'"):
        enc.encode({"action": batch["action"]})


def tiny_vit() -> DinoViT:
    torch.manual_seed(0)
    model = DinoViT(dim=32, depth=2, heads=2, patch=8, grid=4, registers=1)
    with torch.no_grad():
        for p in model.parameters():  # random, not the near-zero init: the features then differ per frame
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_backbone_adapter_loads_a_state_dict_and_torchscript(tmp_path):
    vit = tiny_vit()
    frames, pos = blob_frames(10, 48, 3)
    x = normalize_frames(im.frames_to_tensor(im.decode_images([encode_image(f) for f in frames], 32)))
    with torch.no_grad():
        cls_ref = vit(x)[:, 0]
    sd_path = tmp_path / "vit_tiny.pth"
    torch.save(vit.state_dict(), sd_path)
    assert weights_kind(str(sd_path)) == "state_dict"
    loaded = load_backbone(str(sd_path), heads=2)
    assert loaded.module.arch == vit.arch
    torch.testing.assert_close(loaded.features(x), cls_ref)

    batch = {"image": np.array([encode_image(f) for f in frames], object), "action": np.c_[pos, pos].astype(np.float32)}
    enc = build_encoder("backbone", {"weights": str(sd_path), "image_size": 32, "heads": 2, "chunk": 4})
    assert enc.out_name == "backbone-vit_tiny"
    z = enc.encode(batch)
    assert z.shape == (10, 32 + 4) and enc.dim == 36
    torch.testing.assert_close(torch.from_numpy(z[:, :32]), cls_ref)
    assert np.abs(z[0, :32] - z[1, :32]).max() > 1e-3  # different frames, different features
    # the weights travel in the encoder's bytes: the file may be gone where the actors run
    blob = enc.to_bytes()
    sd_path.unlink()
    np.testing.assert_array_equal(encoder_from_bytes("backbone", blob).encode(batch), z)

    ts_path = tmp_path / "vit_tiny_ts.pt"
    torch.jit.save(torch.jit.trace(vit, x[:2]), str(ts_path))
    assert weights_kind(str(ts_path)) == "torchscript"
    ts = build_encoder("backbone", {"weights": str(ts_path), "image_size": 32, "pool": "mean",
                                    "include_action": False})
    with torch.no_grad():
        mean_ref = vit(x)[:, 2:].mean(1)  # CLS and the register token skipped... by the tokens' layout
    z_ts = ts.encode(batch)
    assert z_ts.shape == (10, 32)
    # a traced module has no `registers` attribute: mean pooling skips only the CLS token there
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(z_ts), vit(x)[:, 1:].mean(1))
    assert not torch.allclose(torch.from_numpy(z_ts), mean_ref)
    pinned = build_encoder("backbone", {"weights": str(ts_path), "image_size": 32, "weights_sha256": ts.sha256})
    assert pinned.sha256 == ts.sha256


def test_backbone_errors_name_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a hub id"):
        build_encoder("backbone", {"weights": str(tmp_path / "missing.pth")})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"bad.pth: not a readable torch file"):
        build_encoder("backbone", {"weights": str(bad)})
    other = tmp_path / "mlp.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ValueError, match=r"mlp.pth: not a DINOv2-style ViT state_dict \(missing"):
        build_encoder("backbone", {"weights": str(other)})
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="a folder without config.json"):
        build_encoder("backbone", {"weights": str(tmp_path / "folder")})
    good = tmp_path / "vit.pth"
    torch.save(tiny_vit().state_dict(), good)
    with pytest.raises(ValueError, match="have sha256 .*, not the weights_sha256 abc given"):
        build_encoder("backbone", {"weights": str(good), "heads": 2, "weights_sha256": "abc"})
    enc = build_encoder("backbone", {"weights": str(good), "heads": 2, "image_size": 30})
    frames, _ = blob_frames(2, 30, 0)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        enc.encode({"image": [encode_image(f) for f in frames], "action": np.zeros((2, 1), np.float32)})
