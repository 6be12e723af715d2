"""Request bodies of the HTTP API and their resolution into generator jobs.

The schema checks types and absolute bounds (it is what ``/openapi.json`` publishes); the
configured limits and the vocabulary are checked in :func:`resolve`, whose errors name the
field. Structured findings become a prompt through the cohort prompt builder, seeded by the
request's seed, so the same body always gives the same prompt.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import random
import secrets
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from factory import vocab
from factory.cohort.prompts import build_prompt
from factory.errors import CtFactoryError
from factory.models.generator import Request
from serve.config import ServeConfig

MAX_SEED = 2**53 - 1  # exact in JSON numbers and JavaScript
AttributeValue = str | int | float


class FieldError(CtFactoryError, ValueError):
    """A request field that cannot be served: answered with 422 naming ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PreviewRequest(BaseModel):
    """One volume to generate: a prompt, or findings that the cohort prompt builder words."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [{"required": ["prompt"]}, {"required": ["findings"]}],
            "examples": [
                {"prompt": "Large bilateral pleural effusion.", "seed": 7},
                {"findings": {"pleural_effusion": {"laterality": "left"}}, "age": 70, "sex": "M"},
            ],
        },
    )

    prompt: str | None = Field(
        None, min_length=1, max_length=100_000, description="free text; or give `findings`"
    )
    findings: list[str] | dict[str, dict[str, AttributeValue]] | None = Field(
        None,
        description="finding ids or CT-RATE names, optionally with attributes "
        "(e.g. {'pleural_effusion': {'laterality': 'left'}}); [] asks for a normal scan",
    )
    negative_prompt: str | None = Field(
        None,
        min_length=1,
        max_length=100_000,
        description="what guidance steers away from; a prompt's own negations "
        "('no pleural effusion') are added to it",
    )
    age: int | None = Field(None, ge=18, le=100, description="with `findings`")
    sex: Literal["M", "F"] | None = Field(None, description="with `findings`")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent")
    steps: int | None = Field(None, ge=1, le=10_000, description="sampler steps")
    guidance: float | None = Field(None, ge=0, le=1_000, description="classifier-free guidance")
    scheduler: Literal["ddim", "ddpm", "rectified_flow"] | None = None
    model: str | None = Field(None, max_length=64, description="a model id from /v1/models")
    masks: dict[str, str] | None = Field(
        None,
        description="anatomy channels to hold fixed: name -> base64 of a .npy (optionally "
        "gzipped) 0/1 array on the model grid",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PreviewRequest:
        if (self.prompt is None) == (self.findings is None):
            raise ValueError("give exactly one of 'prompt' or 'findings'")
        if self.prompt is not None and (self.age is not None or self.sex is not None):
            raise ValueError("'age' and 'sex' go with 'findings'; write them into the prompt")
        return self


class SegmentationRequest(BaseModel):
    """A CT to segment: its anatomy channels sampled with its image latents held fixed."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="base64 of a .npy (optionally gzipped) 3D array of HU on the model grid"
    )
    prompt: str = Field("", max_length=100_000, description="text to condition on (optional)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent")
    steps: int | None = Field(None, ge=1, le=10_000, description="sampler steps")
    guidance: float | None = Field(None, ge=0, le=1_000, description="classifier-free guidance")
    scheduler: Literal["ddim", "ddpm", "rectified_flow"] | None = None
    model: str | None = Field(None, max_length=64, description="a model id from /v1/models")


class VolumeRequest(PreviewRequest):
    format: Literal["nifti", "npy", "zarr"] = Field(
        "nifti", description="nifti: .nii.gz int16 HU; npy: int16 HU; zarr: a zip store"
    )


def published_models(cfg: ServeConfig) -> tuple[type[PreviewRequest], type[VolumeRequest]]:
    """The request models with this server's limits and model ids in their schema, so that
    ``/openapi.json`` (and clients generated from it) say what the server accepts."""
    limits = cfg.limits
    ids = Literal[tuple(cfg.models)]  # type: ignore[valid-type]
    fields = {
        "prompt": (str | None, Field(None, min_length=1, max_length=limits.max_prompt_chars)),
        "negative_prompt": (
            str | None,
            Field(
                None,
                min_length=1,
                max_length=limits.max_prompt_chars,
                description="what guidance steers away from",
            ),
        ),
        "steps": (int | None, Field(None, ge=1, le=limits.max_steps, description="sampler steps")),
        "guidance": (float | None, Field(None, ge=0, le=limits.max_guidance)),
        "model": (ids | None, Field(None, description="a model id from /v1/models")),
    }
    preview = create_model("PreviewBody", __base__=PreviewRequest, **fields)
    volume = create_model("VolumeBody", __base__=VolumeRequest, **fields)
    return preview, volume


@dataclass(frozen=True)
class Job:
    """A validated request for the generator deployment."""

    model: str
    request: Request
    output: str  # nifti, npy, zarr or png


def findings_prompt(
    findings: list[str] | dict[str, dict], age: int | None, sex: str | None, seed: int
) -> str:
    """A structured prompt (``{age} years old {sex}: {impression}``) for the findings."""
    items = findings.items() if isinstance(findings, dict) else ((f, {}) for f in findings)
    rng = random.Random(seed)
    labels: dict[str, int] = {}
    attributes: dict[str, dict] = {}
    for name, attrs in items:
        try:
            fid = vocab.resolve(name)
            attributes[fid] = vocab.complete_attributes(fid, attrs, rng)
        except vocab.VocabError as exc:
            raise FieldError(f"findings.{name}", str(exc)) from None
        labels[fid] = 1
    if age is None:
        age = rng.randint(40, 80)
    if sex is None:
        sex = "M" if rng.random() < vocab.MALE_FRACTION else "F"
    return build_prompt("structured", labels, attributes, age, sex, rng)


def decode_mask(name: str, text: str, max_voxels: int) -> np.ndarray:
    """A base64 .npy (optionally gzipped) 0/1 array; errors name ``masks.NAME``."""
    field = f"masks.{name}"
    mask = decode_npy(field, text, max_voxels)
    if mask.ndim != 3 or mask.dtype.kind not in "biu":
        got = f"{mask.dtype} {mask.shape}"
        raise FieldError(field, f"expected a 3D 0/1 integer or bool array, got {got}")
    if not np.isin(mask, (0, 1)).all():
        raise FieldError(field, "values must be 0 or 1")
    return mask.astype(bool)


def decode_image(text: str, max_voxels: int) -> np.ndarray:
    """A base64 .npy (optionally gzipped) 3D array of finite HU; errors name ``image``."""
    image = decode_npy("image", text, max_voxels)
    if image.ndim != 3 or image.dtype.kind not in "iuf":
        raise FieldError("image", f"expected a 3D integer or float array, got {image.dtype} "
                         f"{image.shape}")  # fmt: skip
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise FieldError("image", "values must be finite")
    return image.astype(np.float32)


def decode_npy(field: str, text: str, max_voxels: int) -> np.ndarray:
    """A base64 .npy, optionally gzipped, of at most ``max_voxels`` values."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(max_voxels * 8 + 1024)
        except (OSError, EOFError):
            raise FieldError(field, "not a valid gzip stream") from None
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise FieldError(field, "not a .npy array (np.save output)") from None
    if array.size > max_voxels:
        raise FieldError(field, f"{array.size:,} values; this server takes at most {max_voxels:,}")
    return array


def volume_id(model_hash: str, request: Request) -> str:
    """Content address of a generation: the same model, prompt, seed and settings, same id."""
    settings = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler")
    parts = (model_hash, *(getattr(request, name) for name in settings))
    given = request.masks or {}
    masks = {k: hashlib.sha256(np.packbits(v)).hexdigest() for k, v in given.items()}
    if request.image is not None:
        masks["image"] = hashlib.sha256(np.ascontiguousarray(request.image).tobytes()).hexdigest()
    key = "\x00".join(str(v) for v in (*parts, sorted(masks.items())))
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def resolve(
    body: PreviewRequest | SegmentationRequest, cfg: ServeConfig, output: str
) -> tuple[str, Request]:
    """Apply the configured limits and defaults: (model id, generator request)."""
    limits = cfg.limits
    model = body.model or cfg.default_model
    if model not in cfg.models:
        raise FieldError("model", f"unknown model {model!r}; valid: {', '.join(cfg.models)}")
    steps = body.steps if body.steps is not None else limits.default_steps
    if steps is not None and steps > limits.max_steps:
        raise FieldError("steps", f"{steps} exceeds this server's limit of {limits.max_steps}")
    guidance = body.guidance if body.guidance is not None else limits.default_guidance
    if guidance is not None and guidance > limits.max_guidance:
        raise FieldError(
            "guidance", f"{guidance} exceeds this server's limit of {limits.max_guidance}"
        )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    if isinstance(body, SegmentationRequest):
        if len(body.prompt) > limits.max_prompt_chars:
            n = limits.max_prompt_chars
            raise FieldError(
                "prompt", f"{len(body.prompt)} characters; this server takes at most {n}"
            )
        image = decode_image(body.image, limits.max_voxels)
        return model, Request(body.prompt, seed, steps, guidance, body.scheduler, image=image)
    if body.findings is not None:
        prompt = findings_prompt(body.findings, body.age, body.sex, seed)
    else:
        prompt = body.prompt or ""
    negative = body.negative_prompt or ""
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limits.max_prompt_chars:
            n = limits.max_prompt_chars
            raise FieldError(name, f"{len(text)} characters; this server takes at most {n}")
    masks = None
    if body.masks:
        masks = {k: decode_mask(k, v, limits.max_voxels) for k, v in body.masks.items()}
    request = Request(prompt, seed, steps, guidance, body.scheduler, masks, negative)
    return model, request
