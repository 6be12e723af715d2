"""The Generator API: volumes with masks, batch-independent seeds, checkpoints, bad requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.models.card import ModelCard
from factory.models.config import load_config
from factory.models.generator import Generator, Request, RequestError
from factory.models.intensity import latent_to_mask, mask_to_latent

TINY = load_config("tiny")
PROMPTS = [
    "70 years old M: Large pleural effusion on the left.",
    "45 years old F: Normal chest CT examination.",
    "Cardiomegaly with coronary artery calcification and a 12 mm nodule in the right upper lobe.",
]


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    return Generator.from_config(TINY, model_hash="test", device="cpu")


def requests(seeds=(11, 22, 33), **kw):
    return [Request(prompt=p, seed=s, steps=2, **kw) for p, s in zip(PROMPTS, seeds, strict=True)]


@pytest.fixture(scope="module")
def batch(generator):
    return generator.generate(requests(), batch_size=3)


def test_volumes_have_hu_masks_geometry_and_provenance(batch):
    assert len(batch) == 3
    for v, r in zip(batch, requests(), strict=True):
        assert v.hu.shape == (64, 64, 64) and v.hu.dtype == np.int16
        assert v.hu.min() >= -1000 and v.hu.max() <= 1000
        assert set(v.masks) == {"lungs", "airway", "vessels", "heart"}
        assert all(m.shape == (64, 64, 64) and m.dtype == np.uint8 for m in v.masks.values())
        assert np.allclose(np.diag(v.affine)[:3], TINY.spacing_mm) and v.spacing == TINY.spacing_mm
        assert (v.prompt, v.seed, v.model_hash) == (r.prompt, r.seed, "test")
        assert v.sampler == {"steps": 2, "guidance": 5.0, "scheduler": "rectified_flow"}
    assert not np.array_equal(batch[0].hu, batch[1].hu)


def test_same_seed_same_volume_whatever_the_batch(generator, batch):
    alone = generator.generate([requests()[2]], batch_size=1)[0]
    assert np.array_equal(alone.hu, batch[2].hu)
    reordered = generator.generate(requests()[::-1], batch_size=2)  # other order and split
    for got, want in zip(reordered[::-1], batch, strict=True):
        assert np.array_equal(got.hu, want.hu)
        assert all(np.array_equal(got.masks[k], want.masks[k]) for k in want.masks)
    other_seed = generator.generate([Request(PROMPTS[2], seed=34, steps=2)])[0]
    assert not np.array_equal(other_seed.hu, batch[2].hu)


def test_fixed_anatomy_masks_come_back(generator):
    lungs = np.zeros((64, 64, 64), dtype=np.uint8)
    lungs[8:30, 12:52, 10:58] = 1
    lungs[34:56, 12:52, 10:58] = 1
    out = generator.generate([Request(PROMPTS[0], seed=5, steps=2, masks={"lungs": lungs})])[0]
    expected = latent_to_mask(mask_to_latent(torch.as_tensor(lungs), 4)[None, None], (64, 64, 64))
    assert np.array_equal(out.masks["lungs"], expected[0, 0])
    assert (out.masks["lungs"] == lungs).mean() > 0.95


def test_a_fixed_image_keeps_its_encoding_and_the_anatomy_is_sampled_for_it(generator):
    hu = np.random.default_rng(0).uniform(-1000, 1000, (64, 64, 64)).astype(np.float32)
    fixed = generator.generate([Request(PROMPTS[0], seed=5, steps=2, image=hu)])[0]
    free = generator.generate([Request(PROMPTS[0], seed=5, steps=2)])[0]
    with torch.no_grad():
        unit = torch.as_tensor(hu / 1000.0)[None, None]
        again = generator.codec.decode(generator.codec.encode(unit))[0, 0]
    expected = np.clip(np.round(again.numpy() * 1000.0), -1000, 1000)
    assert np.abs(fixed.hu - expected).max() <= 1  # the volume is the given one's encoding
    assert not np.array_equal(fixed.hu, free.hu)
    assert set(fixed.masks) == set(TINY.diffusion.anatomy_channels)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request("x", seed=1, steps=0), "request 0: steps"),
        (Request("x", seed=1, guidance=-2), "request 0: guidance"),
        (Request("x", seed=1, scheduler="ddim"), "cannot sample a model trained with objective"),
        (Request("x", seed=1, masks={"liver": np.zeros((64, 64, 64))}), "masks.liver: unknown"),
        (Request("x", seed=1, masks={"lungs": np.zeros((32, 32, 32))}), "does not match"),
        (Request("x", seed=1, image=np.zeros((64, 64, 32))), "image: shape .* does not match"),
    ],
)
def test_bad_requests_fail_before_any_work(generator, request_, message):
    with pytest.raises(RequestError, match=message):
        generator.generate([Request("fine", seed=0, steps=1), request_][1:])


def test_long_prompt_is_truncated_with_a_warning(generator):
    long = " ".join(["bilateral pleural effusion with atelectasis"] * 80)
    with pytest.warns(UserWarning, match="token"):
        out = generator.generate([Request(long, seed=3, steps=1, guidance=1.0)])
    assert out[0].hu.shape == (64, 64, 64)


def test_checkpoint_round_trip_gives_identical_volumes(generator, batch, tmp_path):
    digest = generator.save(tmp_path / "model", ModelCard(name="tiny-random", steps=0))
    loaded = Generator.load(str(tmp_path / "model"), device="cpu")
    assert loaded.model_hash == digest
    again = loaded.generate([requests()[0]])[0]
    assert np.array_equal(again.hu, batch[0].hu) and again.model_hash == digest


@pytest.fixture(scope="module")
def steered() -> Generator:
    """A random generator whose text path matters: MONAI zero-initialises the attention output
    projections, so an untrained UNet ignores its context; give them weights."""
    torch.manual_seed(1)
    g = Generator.from_config(TINY, model_hash="test", device="cpu")
    with torch.no_grad():
        for p in g.unet.parameters():
            if not p.any():
                p.normal_(0, 0.5)
    return g


def test_negations_become_the_negative_prompt(steered):
    """Under ``text.negations: guide`` "no X" conditions on the rest and steers away from X:
    the same volume as the affirmed prompt with X as an explicit negative prompt."""
    said = Request("Mild cardiomegaly. No pleural effusion.", seed=5, steps=2)
    explicit = Request("Mild cardiomegaly.", seed=5, steps=2, negative_prompt="pleural effusion.")
    plain = Request("Mild cardiomegaly.", seed=5, steps=2)
    a, b, c = steered.generate([said, explicit, plain], batch_size=2)
    assert np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.hu, c.hu)
    assert a.sampler["negative_prompt"] == "pleural effusion."
    assert "negative_prompt" not in c.sampler
    # Negations steer only when guidance extrapolates (w > 1): at w = 1 there is no
    # unconditional branch, at w = 0 it is all there is and would draw the negated findings.
    for w in (1.0, 0.0):
        unguided = [
            Request(r.prompt, 5, 2, w, negative_prompt=r.negative_prompt) for r in (said, plain)
        ]
        a1, c1 = steered.generate(unguided, batch_size=1)
        assert np.array_equal(a1.hu, c1.hu), w
        assert "negative_prompt" not in a1.sampler


def test_keep_conditions_on_the_prompt_as_written(steered):
    config = TINY.model_copy(update={"text": TINY.text.model_copy(update={"negations": "keep"})})
    keep = Generator(config, steered.codec, steered.text, steered.unet, "test", "cpu")
    request = Request("no pleural effusion", seed=5, steps=2)
    assert keep.conditioning(request).affirmed == "no pleural effusion"
    assert steered.conditioning(request).affirmed == ""
    (kept,) = keep.generate([request])
    (guided,) = steered.generate([request])
    assert "negative_prompt" not in kept.sampler
    assert not np.array_equal(kept.hu, guided.hu)


def test_unset_sampling_settings_are_the_models_own(tmp_path):
    """One source of sampling defaults: the checkpoint's diffusion.sampling, saved with it."""
    from factory.models.checkpoint import load_checkpoint

    config = TINY.model_copy(
        update={
            "diffusion": TINY.diffusion.model_copy(
                update={"sampling": TINY.diffusion.sampling.model_copy(update={"steps": 1})}
            )
        }
    )
    torch.manual_seed(0)
    model = Generator.from_config(config, device="cpu")
    model.save(tmp_path / "m", ModelCard(name="one-step", steps=0))
    loaded = Generator.load(str(tmp_path / "m"), device="cpu")
    assert load_checkpoint(str(tmp_path / "m")).config.diffusion.sampling.steps == 1
    (volume,) = loaded.generate([Request("Cardiomegaly.", seed=3)])
    assert volume.sampler == {"steps": 1, "guidance": 5.0, "scheduler": "rectified_flow"}
    assert loaded.settings(Request("x", 1, steps=4, guidance=2)) == {
        "steps": 4, "guidance": 2.0, "scheduler": "rectified_flow"
    }  # fmt: skip
