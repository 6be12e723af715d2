"""Samplers: guidance arithmetic, exact on a one-point dataset, anatomy inpainting, settings
checks, per-request noise."""

from __future__ import annotations

import pytest
import torch

from factory.models.config import DiffusionConfig, load_config
from factory.models.diffusion import TextConditionedUNet
from factory.models.samplers import guided, make_scheduler, sample
from factory.models.sampling import SamplerError, check_settings

TINY = load_config("tiny")
DDPM = DiffusionConfig()  # objective ddpm, epsilon prediction, scaled-linear betas
RFLOW = TINY.diffusion


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


def _oracle(cfg: DiffusionConfig, target: torch.Tensor):
    """The exact denoiser of a dataset holding only ``target``."""
    scheduler = make_scheduler(cfg)
    if cfg.objective == "rflow":

        def velocity(x, t):
            s = (t.float() / cfg.num_train_timesteps).view(-1, 1, 1, 1, 1)
            return target - (x - (1 - s) * target) / s

        return velocity
    alphas = scheduler.alphas_cumprod

    def epsilon(x, t):
        a = alphas[t].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    return epsilon


@pytest.mark.parametrize(("cfg", "kind"), [(DDPM, "ddim"), (RFLOW, "rectified_flow")])
def test_the_exact_denoiser_of_one_point_samples_that_point(cfg, kind):
    """The sampler's arithmetic, apart from any network: from any noise, with few steps, the
    exact denoiser of a one-point dataset must land on that point."""
    target = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for seed in (2, 3):
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed))
        out = sample(_oracle(cfg, target), noise, cfg, 10, [torch.Generator()], kind)
        assert torch.allclose(out, target, atol=1e-4)


def test_rectified_flow_starts_from_pure_noise():
    """Its last training step is noise alone, which sampling starts from; DDPM's scaled-linear
    schedule leaves sqrt(0.00073) = 2.7 % of the signal there, which a network learns to read
    and pure noise lacks (why the presets train rectified flow)."""
    z, n = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0)).unbind()
    end = torch.tensor([RFLOW.num_train_timesteps])
    assert torch.equal(make_scheduler(RFLOW).add_noise(z[None], n[None], end), n[None])
    ddpm = make_scheduler(DDPM)
    assert float(ddpm.alphas_cumprod[-1].sqrt()) == pytest.approx(0.027, abs=1e-3)


@pytest.mark.parametrize(
    ("cfg", "kind"), [(DDPM, "ddim"), (DDPM, "ddpm"), (RFLOW, "rectified_flow")]
)
def test_fixed_channels_are_kept_exactly(unet, cfg, kind):
    x, ctx = inputs()
    known = torch.rand_like(x) * 2 - 1
    mask = torch.zeros(2, TINY.latent_channels, dtype=torch.bool)
    mask[0, 4:6] = True  # lungs and airway of the first request
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with torch.inference_mode():
        out = sample(
            guided(unet, ctx, unet.null_context(2), 3.0), x, cfg, 3, gens, kind,
            known, mask, torch.randn_like(x),
        )  # fmt: skip
    assert torch.equal(out[0, 4:6], known[0, 4:6])
    assert not torch.equal(out[1, 4:6], known[1, 4:6])
    assert torch.isfinite(out).all()


def test_each_scheduler_needs_its_objective(unet):
    with pytest.raises(SamplerError, match="valid: ddim, ddpm"):
        make_scheduler(DDPM, "rectified_flow")
    with pytest.raises(SamplerError, match="valid: rectified_flow"):
        make_scheduler(RFLOW, "ddim")


@pytest.mark.parametrize(
    ("steps", "guidance", "message"),
    [(0, 5.0, "steps"), (2.5, 5.0, "steps"), (10, -1.0, "guidance"), (5000, 1.0, "exceeds")],
)
def test_bad_settings_fail_early(steps, guidance, message):
    with pytest.raises(SamplerError, match=message):
        check_settings(steps, guidance, RFLOW, None)


def test_ddpm_noise_comes_from_each_requests_generator(unet):
    x, ctx = inputs(2)
    den = guided(unet, ctx, unet.null_context(2), 1.0)
    with torch.inference_mode():
        pair = sample(den, x, DDPM, 3, [torch.Generator().manual_seed(s) for s in (7, 8)], "ddpm")
        den1 = guided(unet, ctx[:1], unet.null_context(1), 1.0)
        alone = sample(den1, x[:1], DDPM, 3, [torch.Generator().manual_seed(7)], "ddpm")
    assert torch.equal(pair[:1], alone)
