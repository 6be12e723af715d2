"""Samplers: guidance arithmetic, anatomy inpainting, settings checks, per-request noise."""

from __future__ import annotations

import pytest
import torch

from factory.models.config import DiffusionConfig, load_config
from factory.models.diffusion import TextConditionedUNet
from factory.models.samplers import SamplerError, check_settings, guided, make_scheduler, sample

TINY = load_config("tiny")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return TextConditionedUNet(TINY).eval()


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, TINY.latent_channels, 8, 8, 8, generator=g)
    tokens = torch.randn(batch, 12, 384, generator=g)
    return x, TextConditionedUNet(TINY).context(tokens, torch.ones(batch, 12, dtype=torch.bool))


def test_guidance_one_is_the_conditional_prediction(unet):
    x, ctx = inputs()
    t = torch.tensor([400, 400])
    calls = []

    def model(a, b, c):
        calls.append(a.shape[0])
        return unet(a, b, c)

    with torch.inference_mode():
        cond = unet(x, t, ctx)
        assert torch.equal(guided(model, ctx, unet.null_context(2), 1.0)(x, t), cond)
        assert calls == [2]  # no unconditional pass at w = 1
        w = 5.0
        uncond = unet(x, t, unet.null_context(2))
        got = guided(model, ctx, unet.null_context(2), w)(x, t)
        assert calls[-1] == 4  # cond and uncond in one batched pass
        assert torch.allclose(got, uncond + w * (cond - uncond), atol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_fixed_channels_are_kept_exactly(unet, kind):
    x, ctx = inputs()
    known = torch.rand_like(x) * 2 - 1
    mask = torch.zeros(2, TINY.latent_channels, dtype=torch.bool)
    mask[0, 4:6] = True  # lungs and airway of the first request
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with torch.inference_mode():
        out = sample(
            guided(unet, ctx, unet.null_context(2), 3.0), x, TINY.diffusion, 3, gens, kind,
            known, mask, torch.randn_like(x),
        )  # fmt: skip
    assert torch.equal(out[0, 4:6], known[0, 4:6])
    assert not torch.equal(out[1, 4:6], known[1, 4:6])
    assert torch.isfinite(out).all()


def test_rectified_flow_needs_an_rflow_model(unet):
    with pytest.raises(SamplerError, match="valid: ddim, ddpm"):
        make_scheduler(TINY.diffusion, "rectified_flow")
    rflow = DiffusionConfig(objective="rflow")
    x, ctx = inputs(1)
    with torch.inference_mode():
        out = sample(
            lambda a, t: unet(a, t, ctx), x, rflow, 4, [torch.Generator()], "rectified_flow"
        )
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("steps", "guidance", "message"),
    [(0, 5.0, "steps"), (2.5, 5.0, "steps"), (10, -1.0, "guidance"), (5000, 1.0, "exceeds")],
)
def test_bad_settings_fail_early(steps, guidance, message):
    with pytest.raises(SamplerError, match=message):
        check_settings(steps, guidance, TINY.diffusion, None)


def test_ddpm_noise_comes_from_each_requests_generator(unet):
    x, ctx = inputs(2)
    den = guided(unet, ctx, unet.null_context(2), 1.0)
    with torch.inference_mode():
        pair = sample(
            den, x, TINY.diffusion, 3, [torch.Generator().manual_seed(s) for s in (7, 8)], "ddpm"
        )
        den1 = guided(unet, ctx[:1], unet.null_context(1), 1.0)
        alone = sample(den1, x[:1], TINY.diffusion, 3, [torch.Generator().manual_seed(7)], "ddpm")
    assert torch.equal(pair[:1], alone)
