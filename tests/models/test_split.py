"""Split decoding (MAISI's method): every layer in chunks along one axis, GroupNorm by the
whole tensor's statistics, equal to the whole decode; the chunk count from a memory budget."""

from __future__ import annotations

import pytest
import torch

from factory.models.config import ConfigError, VAEConfig, load_config
from factory.models.generator import Generator
from factory.models.split import WHOLE, Split, choose_split, peak_bytes, ranges, split_decode
from factory.models.vae import LatentCodec, build_vae


def random_vae(cfg: VAEConfig, seed: int = 0):
    """A VAE with random weights, its GroupNorms' scales and shifts random too (not 1 and 0,
    which would hide a normalisation applied with the wrong statistics)."""
    torch.manual_seed(seed)
    vae = build_vae(cfg).eval()
    for m in vae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return vae


# Two levels of res blocks that change channels (a 1x1 shortcut) and two upsamplings.
CFG = VAEConfig(channels=(8, 16, 32), num_res_blocks=2, norm_num_groups=4)


@pytest.mark.parametrize(
    ("shape", "plan"),
    [((9, 7, 5), Split(2)), ((9, 7, 5), Split(3, stream=True)), ((6, 11, 4), Split(5, True))],
)
def test_a_split_decode_equals_the_whole_decode(shape, plan):
    vae = random_vae(CFG)
    z = torch.randn(2, CFG.latent_channels, *shape)
    with torch.no_grad():
        whole = vae.decode(z)
        split = split_decode(vae, z, plan)
    assert split.shape == whole.shape == (2, 1, *(4 * s for s in shape))
    assert (split - whole).abs().max().item() < 1e-4
    assert whole.abs().max().item() > 0.5  # not equal by being all zeros


def test_slabs_with_their_own_statistics_do_not_equal_it():
    """The approximation the split decode replaces: slab-wise GroupNorm moves the values."""
    vae = random_vae(CFG)
    z = torch.randn(1, CFG.latent_channels, 6, 6, 12)
    with torch.no_grad():
        whole = vae.decode(z)
        slabs = LatentCodec(vae, CFG.model_copy(update={"decode_slab": 4})).decode(z)
        budget = peak_bytes(vae.decoder, tuple(z.shape), Split(4), 4) / 2**30
        codec = LatentCodec(vae, CFG.model_copy(update={"decode_memory_gb": budget}))
        assert codec.split(tuple(z.shape), 4).chunks > 1
        split = codec.decode(z)
    assert (split - whole).abs().max().item() < 1e-4
    assert (slabs - whole).abs().max().item() > 1e-2


def test_the_codec_chooses_the_split_count_from_its_memory_budget():
    vae = random_vae(CFG)
    latent = (1, CFG.latent_channels, 8, 8, 8)
    plans = [WHOLE, Split(2), Split(8), Split(8, stream=True)]
    budgets = [peak_bytes(vae.decoder, latent, p, 4) / 2**30 for p in plans]
    assert budgets == sorted(budgets, reverse=True)  # more chunks, streaming: less memory
    chosen = [choose_split(vae.decoder, latent, budget, 4) for budget in budgets]
    assert chosen[0] == WHOLE and chosen[-1].stream and not chosen[1].stream
    assert [p.chunks for p in chosen[:3]] == sorted(p.chunks for p in chosen[:3])
    codec = LatentCodec(vae, CFG.model_copy(update={"decode_memory_gb": budgets[-1]}))
    assert codec.split(latent, 4) == chosen[-1]
    calls = []
    original = vae.decode
    vae.decode = lambda z: calls.append(z.shape) or original(z)  # the whole decode, unused
    with torch.no_grad():
        out = codec.decode(torch.randn(latent))
    assert out.shape == (1, 1, 32, 32, 32) and not calls


def test_a_budget_too_small_is_refused_when_the_generator_is_made():
    """Named with what it needs, before any sampling (not at the first decode)."""
    base = load_config("base")
    vae = build_vae(base.vae)
    with pytest.raises(ConfigError, match=r"vae.decode_memory_gb: 0.5 GiB .* at least [\d.]+ GiB"):
        choose_split(vae.decoder, (1, 4, *base.latent_size), 0.5, 4)
    tiny = load_config("tiny")
    small = tiny.model_copy(update={"vae": tiny.vae.model_copy(update={"decode_memory_gb": 1e-6})})
    with pytest.raises(ConfigError, match=r"vae\.decode_memory_gb: 1e-06 GiB"):
        Generator.from_config(small, device="cpu")


def test_ranges_cover_the_axis_in_order():
    assert ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert ranges(2, 5) == [(0, 1), (1, 2)]  # never an empty chunk
