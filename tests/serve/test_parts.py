"""The serving pieces without Ray: config, request resolution, rendering, the batch core."""

from __future__ import annotations

import base64
import gzip
import io
import json
import threading
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import zarr
from PIL import Image
from pydantic import ValidationError

import serve.generator
from factory.anatomy import channels_from_labels
from factory.models.generator import Generator, Request
from factory.store.layout import read_volume
from serve.cli import config_from_args
from serve.config import ServeConfigError, load_serve_config, parse_serve_config
from serve.generator import run_batch
from serve.schemas import (
    FieldError,
    Job,
    PreviewRequest,
    SegmentationRequest,
    decode_image,
    decode_mask,
    findings_prompt,
    published_models,
    resolve,
    volume_id,
    with_arrays,
)
from tests.store_helpers import small_model


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return Generator.load(str(small_model(tmp_path_factory.mktemp("m") / "small")), device="cpu")


def _b64(mask: np.ndarray, zipped: bool = False) -> str:
    buffer = io.BytesIO()
    np.save(buffer, mask)
    raw = gzip.compress(buffer.getvalue()) if zipped else buffer.getvalue()
    return base64.b64encode(raw).decode()


def test_shipped_config_is_valid_and_errors_name_the_key(tmp_path):
    cfg = load_serve_config("serve/config.yaml")
    assert cfg.models == {"demo": "builtin:demo"} and cfg.default_model == "demo"
    assert cfg.limits.default_steps is None  # each model's own sampling settings
    cases = [
        ({"default_model": "nope"}, "default_model"),
        ({"models": {"bad id!": "builtin:demo"}, "default_model": "bad id!"}, "is not valid"),
        ({"limits": {"max_stepz": 3}}, "limits.max_stepz"),
        ({"limits": {"default_steps": 50, "max_steps": 10}}, "default_steps 50 > max_steps 10"),
        ({"batching": {"max_batch_size": 16}}, "batches could not fill"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "min_replicas 3"),
    ]
    for args, message in cases:
        with pytest.raises(ServeConfigError, match=message):
            parse_serve_config(args, "x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: 3\n")
    with pytest.raises(ServeConfigError, match=r"bad\.yaml: expected a Ray Serve config"):
        load_serve_config(bad)


def test_cli_config_overrides():
    import argparse

    ns = argparse.Namespace(
        config="serve/config.yaml", model=["big=s3://m/big"], default_model="big", port=8000
    )
    args = config_from_args(ns)
    assert args["models"] == {"demo": "builtin:demo", "big": "s3://m/big"}
    assert args["default_model"] == "big"
    from factory.errors import CtFactoryError, UsageError

    with pytest.raises(UsageError, match="expected ID=REF"):
        config_from_args(argparse.Namespace(**{**vars(ns), "model": ["big"]}))
    with pytest.raises(CtFactoryError, match="default_model 'x' is not in models"):
        config_from_args(argparse.Namespace(**{**vars(ns), "default_model": "x"}))


def test_findings_become_a_seeded_structured_prompt():
    a = findings_prompt({"Pleural effusion": {"laterality": "left"}}, 70, "M", seed=5)
    assert a == findings_prompt({"pleural_effusion": {"laterality": "left"}}, 70, "M", seed=5)
    assert a.startswith("70 years old male:") and "left" in a and "effusion" in a.lower()
    normal = findings_prompt([], None, None, seed=1)
    assert "years old" in normal and "effusion" not in normal.lower()
    with pytest.raises(FieldError, match="did you mean 'pleural_effusion'") as info:
        findings_prompt(["pleural efusion"], None, None, seed=1)
    assert info.value.field == "findings.pleural efusion"
    with pytest.raises(FieldError, match="has no attribute 'side'"):
        findings_prompt({"pleural_effusion": {"side": "left"}}, None, None, seed=1)


def test_shipped_config_states_only_what_it_changes():
    """Every value serve/config.yaml gives differs from the code's default: a restated default
    could silently disagree with the code when the default moves."""
    from serve.config import ServeConfig, read_app_args

    args, _ = read_app_args("serve/config.yaml")
    defaults = ServeConfig().model_dump(mode="json")

    def leaves(tree, prefix=()):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "models":
                yield from leaves(value, (*prefix, key))
            else:
                yield (*prefix, key), value

    assert args, "the shipped config should state at least one change"
    for path, value in leaves(args):
        default = defaults
        for key in path:
            default = default[key]
        assert value != default, f"serve/config.yaml restates the default {'.'.join(path)}"


def test_resolve_applies_limits_and_defaults():
    cfg = parse_serve_config({"limits": {"max_steps": 10, "default_steps": 4}})
    job = resolve(PreviewRequest(prompt="Cardiomegaly."), cfg, "png")
    req = job.request
    assert job.model == "demo" and req.steps == 4 and req.guidance is None
    assert 0 <= req.seed < 2**31
    req = resolve(PreviewRequest(prompt="Cardiomegaly."), parse_serve_config({}), "png").request
    assert req.steps is None  # the generator applies the model's own (diffusion.sampling)
    with pytest.raises(FieldError, match="exceeds this server's limit of 10") as info:
        resolve(PreviewRequest(prompt="x", steps=11), cfg, "png")
    assert info.value.field == "steps"
    with pytest.raises(FieldError, match="unknown model 'other'; valid: demo"):
        resolve(PreviewRequest(prompt="x", model="other"), cfg, "png")
    with pytest.raises(FieldError, match="at most 2000"):
        resolve(PreviewRequest(prompt="x" * 2001), cfg, "png")
    with pytest.raises(ValueError, match="exactly one of 'prompt' or 'findings'"):
        PreviewRequest(prompt="x", findings=["emphysema"])


def test_negative_prompt_reaches_the_request_and_its_address():
    cfg = parse_serve_config({})
    body = {"prompt": "Cardiomegaly.", "seed": 3}
    plain = resolve(PreviewRequest(**body), cfg, "png").request
    steered = resolve(
        PreviewRequest(**body, negative_prompt="pleural effusion"), cfg, "png"
    ).request
    assert plain.negative_prompt == "" and steered.negative_prompt == "pleural effusion"
    assert volume_id("h", plain) != volume_id("h", steered)
    assert volume_id("h", steered) == volume_id(
        "h", resolve(PreviewRequest(**body, negative_prompt="pleural effusion"), cfg, "png").request
    )
    with pytest.raises(FieldError, match="at most 2000") as info:
        resolve(PreviewRequest(**body, negative_prompt="x" * 2001), cfg, "png")
    assert info.value.field == "negative_prompt"


def _npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    """A .npy 1.0 header that claims ``shape``, with no data after it."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def test_masks_decode_or_name_the_field():
    grid = (4, 4, 4)
    mask = np.zeros(grid, np.uint8)
    mask[1:3] = 1
    assert decode_mask("lungs", _b64(mask), grid).sum() == 32
    assert decode_mask("lungs", _b64(mask.astype(bool), zipped=True), grid).sum() == 32
    fortran = decode_mask("lungs", _b64(np.asfortranarray(mask.transpose(2, 0, 1))), grid)
    assert np.array_equal(fortran, mask.transpose(2, 0, 1))
    big_endian = decode_mask("lungs", _b64(mask.astype(">i2"), zipped=True), grid)
    assert np.array_equal(big_endian, mask)
    npy = base64.b64decode(_b64(mask))
    bad = [
        ("@@@", "not valid base64"),
        (base64.b64encode(b"not npy").decode(), "not a .npy"),
        # a header numpy's filter fails to tokenize (TokenError: it was a 500)
        (base64.b64encode(b"\x93NUMPY\x01\x00\x0b\x00{'descr': (").decode(), "not a .npy"),
        (_b64(mask * 3), "values must be 0 or 1"),
        (_b64(np.zeros((4, 4))), r"shape \(4, 4\) does not match the model grid \(4, 4, 4\)"),
        (_b64(np.zeros(grid, np.float32)), "dtype float32 is not accepted; valid: bool, int"),
        (base64.b64encode(_npy_header(grid, "|O")).decode(), "dtype object is not accepted"),
        (base64.b64encode(npy[:-1]).decode(), "declares 64 bytes of data, the stream holds 63"),
        (base64.b64encode(npy + b"\0").decode(), "the stream holds more"),
        (base64.b64encode(gzip.compress(npy)[:-9]).decode(), "not a valid gzip stream"),
    ]
    for text, message in bad:
        with pytest.raises(FieldError, match=message) as info:
            decode_mask("lungs", text, grid)
        assert info.value.field == "masks.lungs"


def test_huge_arrays_are_refused_from_their_header_before_any_inflation():
    """A header claiming 10^15 voxels, or a gzip bomb (128 MiB of zeros in 127 KiB), is refused
    by the shape in its header, and a bomb on the model grid by its trailing data: never
    inflated in full (the peak of memory allocated stays far below the bomb's 128 MiB)."""
    grid = (64, 64, 64)
    huge = base64.b64encode(_npy_header((10**5,) * 3)).decode()
    bomb = gzip.compress(_npy_header((512, 512, 512)) + bytes(128 * 2**20), 9)
    on_grid = gzip.compress(_npy_header(grid) + bytes(64**3 + 128 * 2**20), 9)
    assert len(bomb) < 2**17 and len(on_grid) < 2**17
    cases = [
        (huge, r"shape \(100000, 100000, 100000\) does not match the model grid"),
        (base64.b64encode(bomb).decode(), r"shape \(512, 512, 512\) does not match"),
        (base64.b64encode(on_grid).decode(), "the stream holds more"),
    ]
    tracemalloc.start()
    try:
        for text, message in cases:
            with pytest.raises(FieldError, match=message):
                decode_mask("lungs", text, grid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated to refuse them"


def test_images_decode_or_name_the_field():
    grid = (4, 4, 4)
    hu = np.full(grid, -1000, np.int16)
    assert decode_image(_b64(hu, zipped=True), grid).dtype == np.float32
    bad = [
        (_b64(np.zeros((4, 4))), grid, "does not match the model grid"),
        (_b64(np.full(grid, np.nan, np.float32)), grid, "must be finite"),
        (_b64(np.zeros(grid, bool)), grid, "dtype bool is not accepted; valid: int, uint, float"),
        (_b64(np.zeros(grid, np.complex64)), grid, "dtype complex64 is not accepted"),
        (_b64(hu), (2, 2, 2), r"shape \(4, 4, 4\) does not match the model grid \(2, 2, 2\)"),
    ]
    for text, expected, message in bad:
        with pytest.raises(FieldError, match=message) as info:
            decode_image(text, expected)
        assert info.value.field == "image"


def test_prompts_with_control_characters_are_refused_naming_the_field():
    """Tab, LF and CR are text; NUL, ESC, DEL, C1 controls and U+2028/U+2029 are refused,
    naming the field and the character, by the published bodies as by the base ones."""
    assert PreviewRequest(prompt="Effusion.\r\n\tLeft.").prompt == "Effusion.\r\n\tLeft."
    preview, volume, segmentation = published_models(parse_serve_config({}))
    for char in ("\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"):
        for model, body, name in (
            (PreviewRequest, {"prompt": f"a{char}"}, "prompt"),
            (volume, {"prompt": "x", "negative_prompt": f"a{char}"}, "negative_prompt"),
            (segmentation, {"image": "AAAA", "prompt": f"a{char}"}, "prompt"),
            (preview, {"prompt": f"a{char}"}, "prompt"),
        ):
            with pytest.raises(ValidationError) as info:
                model(**body)
            (e,) = info.value.errors()
            assert e["loc"] == (name,) and f"U+{ord(char):04X} at index 1" in e["msg"]
    with pytest.raises(ValidationError, match="at most 2000 characters"):
        segmentation(image="AAAA", prompt="x" * 2001)  # the limit is in the published schema
    schema = segmentation.model_json_schema()["properties"]["prompt"]
    assert schema["maxLength"] == 2000 and "no control characters" in schema["description"]


def test_a_segmentation_job_returns_the_sampled_anatomy_as_a_label_map(generator):
    grid = tuple(generator.config.size)
    hu = np.random.default_rng(0).integers(-1000, 1000, grid).astype(np.int16)
    body = SegmentationRequest(image=_b64(hu, zipped=True), seed=4, steps=2, model="small")
    cfg = parse_serve_config({"models": {"small": "builtin:demo"}, "default_model": "small"})
    job = resolve(body, cfg, "segmentation")
    assert job.request.image is None and job.image == body.image  # decoded by the replica
    model = job.model
    (result,) = run_batch(generator, model, [job])
    assert result.status == 200 and result.media_type == "application/gzip"
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(result.body)).dataobj)
    legend = {int(k): v for k, v in json.loads(result.headers["X-Anatomy-Legend"]).items()}
    (volume,) = generator.generate([with_arrays(job, grid).request])
    masks = channels_from_labels(labels, legend, ("lungs", "heart"))
    assert np.array_equal(masks[0], volume.masks["lungs"])
    assert np.array_equal(masks[1], volume.masks["heart"])
    free = volume_id(generator.model_hash, Request("", seed=4, steps=2))
    assert result.headers["X-Volume-Id"] != free  # the image is part of the address
    wrong = Request("", seed=1, steps=2, image=np.zeros((8, 8, 8)))
    (refused,) = run_batch(generator, model, [Job(model, wrong, "segmentation")])
    assert refused.status == 422 and refused.field == "image"
    off_grid = Job(model, Request("", seed=1, steps=2), "segmentation", image=_b64(hu[:8]))
    (refused,) = run_batch(generator, model, [off_grid])
    assert refused.status == 422 and refused.field == "image"
    assert (
        refused.error
        == f"image: shape (8, {grid[1]}, {grid[2]}) does not match the model grid {grid}"
    )


def test_run_batch_renders_every_format_and_reports_bad_jobs(generator, tmp_path):
    grid = tuple(generator.config.size)
    good = Request("Pleural effusion.", seed=3, steps=2)
    jobs = [
        Job("small", good, "nifti"),
        Job("small", good, "npy"),
        Job("small", Request("x", seed=1, steps=2, masks={"liver": np.zeros(grid)}), "nifti"),
        Job("small", good, "zarr"),
        Job("small", good, "png"),
        Job("small", good, "anatomy"),
    ]
    results = run_batch(generator, "small", jobs)
    assert [r.status for r in results] == [200, 200, 422, 200, 200, 200]
    assert results[2].field == "masks.liver" and "valid: lungs, heart" in results[2].error
    assert {r.headers["X-Batch-Size"] for r in results if r.status == 200} == {"5"}
    assert results[0].headers["X-Anatomy"] == "lungs,heart"  # what format anatomy returns
    vid = volume_id(generator.model_hash, good)
    assert results[0].headers["X-Volume-Id"] == vid and results[0].headers["X-Seed"] == "3"

    image = nib.Nifti1Image.from_bytes(gzip.decompress(results[0].body))
    hu = np.asarray(image.dataobj)
    assert hu.shape == grid and hu.dtype == np.int16
    np.testing.assert_allclose(image.affine, generator.grid.affine())
    assert int(image.header["sform_code"]) == 1 and -1024 <= hu.min() <= hu.max() <= 3071
    assert np.array_equal(np.load(io.BytesIO(results[1].body)), hu)

    path = tmp_path / "volume.zarr.zip"
    path.write_bytes(results[3].body)
    stored = read_volume(zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r"), vid)
    assert np.array_equal(stored.hu, hu) and set(stored.masks) == {"lungs", "heart"}
    assert stored.record["prompt"] == "Pleural effusion." and stored.record["seed"] == 3
    # format anatomy: the same volume's masks as one label map, its legend in a header
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(results[5].body)).dataobj)
    legend = {int(k): v for k, v in json.loads(results[5].headers["X-Anatomy-Legend"]).items()}
    masks = channels_from_labels(labels, legend, ("lungs", "heart"))
    assert np.array_equal(masks[0], stored.masks["lungs"])
    assert np.array_equal(masks[1], stored.masks["heart"])

    png = Image.open(io.BytesIO(results[4].body))
    assert png.format == "PNG" and png.width > 3 * 150 and png.height > 2 * 150
    assert len(set(np.asarray(png).ravel().tolist())) > 16  # a picture, not a flat field


def test_the_next_batch_samples_while_one_is_encoded(generator, monkeypatch):
    """Encoding happens outside the sampling lock: with a batch held in its encoding until
    another batch has sampled, both finish (holding the lock would keep the second out)."""
    sampling = threading.Lock()
    encoding, second_sampled = threading.Event(), threading.Event()
    waited: list[bool] = []
    encode, generate = serve.generator.encode, generator.generate

    def held_encode(gen, model_id, job, volume):
        if job.request.seed == 1:
            encoding.set()
            waited.append(second_sampled.wait(30))
        return encode(gen, model_id, job, volume)

    def noting_generate(requests, batch_size):
        volumes = generate(requests, batch_size)
        if requests[0].seed == 2:
            second_sampled.set()
        return volumes

    monkeypatch.setattr(serve.generator, "encode", held_encode)
    monkeypatch.setattr(generator, "generate", noting_generate)
    first: list = []
    job = lambda seed: [Job("small", Request("Effusion.", seed=seed, steps=2), "nifti")]  # noqa: E731
    thread = threading.Thread(
        target=lambda: first.extend(run_batch(generator, "small", job(1), sampling))
    )
    thread.start()
    assert encoding.wait(60)
    second = run_batch(generator, "small", job(2), sampling)
    thread.join(60)
    assert waited == [True], "the second batch could not sample while the first was encoded"
    assert [r.status for r in first + second] == [200, 200]
