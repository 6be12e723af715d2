"""Model configs and networks: validation, shapes, and that each network can learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.models.config import ConfigError, load_config, parse_config, presets
from factory.models.diffusion import TextConditionedUNet
from factory.models.intensity import hu_to_unit, latent_to_mask, mask_to_latent, unit_to_hu
from factory.models.vae import LatentCodec, build_vae
from factory.phantom.dataset import default_grid
from factory.phantom.render import render_phantom

TINY = load_config("tiny")


@pytest.fixture(scope="module")
def phantoms() -> torch.Tensor:
    """Four 32^3 phantoms in [-1, 1] (the VAE is fully convolutional: crops train it)."""
    grid = default_grid((32, 32, 32), None)
    vols = [render_phantom(grid, {}, "M", 50, seed).image for seed in range(4)]
    return hu_to_unit(torch.as_tensor(np.stack(vols), dtype=torch.float32)[:, None], TINY.hu_window)


def test_presets_load_and_derive_shapes():
    assert {"tiny", "base"} <= set(presets())
    base = load_config("base")
    assert TINY.size == (64, 64, 64) and TINY.latent_size == (16, 16, 16)
    assert TINY.latent_channels == 4 + 4 and base.size == (512, 512, 128)
    assert base.latent_size == (128, 128, 32)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"size": [66, 64, 64]}, "divisible by the VAE factor"),
        ({"vae": {"chanels": [8, 16]}}, "vae.chanels"),
        ({"diffusion": {"anatomy_channels": ["liver"]}}, "unknown anatomy channels"),
        ({"hu_window": [100, -100]}, "hu_window"),
        ({"diffusion": {"cond_dropout": 1.5}}, "diffusion.cond_dropout"),
    ],
)
def test_bad_configs_name_the_field(change, field):
    data = {"name": "x", "size": [64, 64, 64], "spacing_mm": [1, 1, 1], **change}
    with pytest.raises(ConfigError, match=field) as info:
        parse_config(data, "my.yaml")
    assert str(info.value).startswith("my.yaml:")


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nope")


def test_intensity_round_trip():
    hu = torch.tensor([-1500.0, -1000.0, -350.0, 0.0, 40.0, 999.0, 3000.0])
    back = unit_to_hu(hu_to_unit(hu, (-1000, 1000)), (-1000, 1000))
    assert back.dtype == np.int16
    assert back.tolist() == [-1000, -1000, -350, 0, 40, 999, 1000]
    mask = torch.zeros(8, 8, 8)
    mask[:4] = 1
    lat = mask_to_latent(mask, 4)
    assert lat.shape == (2, 2, 2) and lat[0].eq(1).all() and lat[1].eq(-1).all()
    assert (latent_to_mask(lat[None, None], (8, 8, 8))[0, 0] == mask.numpy()).all()


def test_tiny_shapes_and_dtypes():
    codec = LatentCodec(build_vae(TINY.vae), TINY.vae).eval()
    unet = TextConditionedUNet(TINY).eval()
    with torch.inference_mode():
        z = codec.encode(torch.zeros(2, 1, 64, 64, 64))
        assert z.shape == (2, 4, 16, 16, 16) and z.dtype == torch.float32
        assert codec.decode(z).shape == (2, 1, 64, 64, 64)
        x = torch.zeros(2, TINY.latent_channels, 16, 16, 16)
        ctx = unet.context(torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool))
        assert ctx.shape == (2, 1 + TINY.text.max_tokens, 385) and ctx[:, 6:].abs().sum() == 0
        assert ctx[:, :6, -1].eq(1).all()
        assert unet(x, torch.tensor([1, 500]), ctx).shape == x.shape


def test_cross_attention_masks_padding():
    """Padded positions are masked out: what they hold changes nothing, real tokens do."""
    torch.manual_seed(0)
    unet = TextConditionedUNet(TINY).eval()
    for p in unet.parameters():  # MONAI zero-initialises output projections
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, TINY.latent_channels, 16, 16, 16)
    t = torch.tensor([300])
    tokens = torch.randn(1, 8, 384)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    ctx = unet.context(tokens, mask)
    garbage = ctx.clone()
    garbage[:, 6:, :-1] = torch.randn_like(garbage[:, 6:, :-1]) * 10
    other = ctx.clone()
    other[:, 2, :-1] += 1.0
    with torch.no_grad():
        base = unet(x, t, ctx)
        torch.testing.assert_close(unet(x, t, garbage), base)
        assert (unet(x, t, other) - base).abs().max() > 1e-3
        assert (unet(x, t, unet.null_context(1)) - base).abs().max() > 1e-3


def test_pooled_embedding_reaches_the_timestep_embedding():
    """The pooled prompt, projected, is added to the timestep embedding that every ResBlock
    sees; a config without ``pooled_embedding`` has no such weights (older checkpoints)."""
    torch.manual_seed(0)
    unet = TextConditionedUNet(TINY).eval()
    for p in unet.parameters():
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, TINY.latent_channels, 16, 16, 16)
    t = torch.tensor([300])
    ctx = unet.context(torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool))
    with torch.no_grad():
        with_pooled = unet(x, t, ctx)
        unet.pooled[-1].weight.zero_()
        unet.pooled[-1].bias.zero_()
        assert (unet(x, t, ctx) - with_pooled).abs().max() > 1e-3
    plain = TINY.model_copy(
        update={"diffusion": TINY.diffusion.model_copy(update={"pooled_embedding": False})}
    )
    keys = TextConditionedUNet(plain).state_dict()
    assert not [k for k in keys if k.startswith("pooled.")]
    assert set(keys) < set(unet.state_dict())


def test_null_condition_and_dropout():
    unet = TextConditionedUNet(TINY).eval()
    drop = unet.drop_mask(64, torch.Generator().manual_seed(0))
    assert 1 <= int(drop.sum()) <= 16  # p = 0.1 of 64 rows
    x = torch.randn(4, TINY.latent_channels, 16, 16, 16)
    t = torch.tensor([10, 10, 10, 10])
    ctx = unet.context(torch.randn(4, 9, 384), torch.ones(4, 9, dtype=torch.bool))
    null = unet.null_context(4)
    assert null.shape == ctx.shape and null[:, 1:].abs().sum() == 0
    rows = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = unet(x, t, ctx, rows)
        torch.testing.assert_close(out[rows], unet(x, t, null)[rows])
        torch.testing.assert_close(out[~rows], unet(x, t, ctx)[~rows])


def _fit(model, loss_fn, steps=8, lr=2e-3) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def test_vae_learns_phantoms(phantoms):
    torch.manual_seed(0)
    vae = build_vae(TINY.vae)

    def loss():
        recon, mu, sigma = vae(phantoms)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        return (recon - phantoms).abs().mean() + 1e-6 * kl

    first, last = _fit(vae, loss)
    assert last < 0.7 * first


def test_unet_learns_to_denoise(phantoms):
    from monai.networks.schedulers import DDPMScheduler

    torch.manual_seed(0)
    unet = TextConditionedUNet(TINY)
    latents = torch.nn.functional.avg_pool3d(phantoms, 4).repeat(1, TINY.latent_channels, 1, 1, 1)[
        :, :, :4, :4, :4
    ]
    latents = torch.nn.functional.interpolate(latents, size=(8, 8, 8))
    noise = torch.randn_like(latents)
    t = torch.tensor([700, 800, 900, 990])  # mostly noise: a mapping 15 steps can start on
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(latents, noise, t)
    ctx = unet.context(torch.randn(4, 9, 384), torch.ones(4, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="context of shape"):
        unet(noisy, t, torch.randn(4, TINY.text.max_tokens, 384))
    first, last = _fit(unet, lambda: (unet(noisy, t, ctx) - noise).pow(2).mean(), 12, 1e-3)
    assert last < 0.8 * first


def test_slab_codec_bounds_the_work_and_keeps_shapes():
    cfg = TINY.vae.model_copy(update={"decode_slab": 4})
    vae = build_vae(TINY.vae).eval()
    whole, slabs = LatentCodec(vae, TINY.vae), LatentCodec(vae, cfg)
    x = torch.rand(1, 1, 32, 32, 48) * 2 - 1
    with torch.inference_mode():
        seen = []
        original = vae.decoder.forward
        vae.decoder.forward = lambda z: seen.append(z.shape[-1]) or original(z)
        z = slabs.encode(x)
        assert z.shape == whole.encode(x).shape == (1, 4, 8, 8, 12)
        out = slabs.decode(z)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert seen and max(seen) == 4  # the decoder never saw more than one slab
