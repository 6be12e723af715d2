"""Request bodies of the HTTP API and their resolution into generator jobs.

The schema checks types and absolute bounds (it is what ``/openapi.json`` publishes); the
configured limits and the vocabulary are checked in :func:`resolve`, whose errors name the
field. Structured findings become a prompt through the cohort prompt builder, seeded by the
request's seed, so the same body always gives the same prompt.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import hashlib
import io
import math
import random
import re
import secrets
import tokenize
import zlib
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from numpy.lib import format as npy_format
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from factory import vocab
from factory.cohort.prompts import build_prompt
from factory.errors import CtFactoryError
from factory.models.generator import Request
from serve.config import ServeConfig

MAX_SEED = 2**53 - 1  # exact in JSON numbers and JavaScript
AttributeValue = str | int | float
TEXT_RULE = "no control characters but tab, LF and CR, and no U+2028 or U+2029"
# C0 controls but tab, LF and CR; DEL and the C1 controls; the line and paragraph separators
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
NPY_HEAD_BYTES = 12 + 10_000  # magic, version, header length, and the longest header numpy reads
GZIP_MAGIC = b"\x1f\x8b"
KIND_NAMES = {"b": "bool", "i": "int", "u": "uint", "f": "float"}


class FieldError(CtFactoryError, ValueError):
    """A request field that cannot be served: answered with 422 naming ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def plain_text(text: str) -> str:
    """Free text as given, refused if it holds a control character other than tab, LF or CR,
    or U+2028/U+2029: they mean nothing to the text encoder, and they corrupt the logs,
    terminals and line-based records that show a prompt."""
    found = CONTROL.search(text)
    if found:
        raise PydanticCustomError(
            "control_character",
            "character U+{code} at index {index} is not accepted: " + TEXT_RULE,
            {"code": f"{ord(found.group()):04X}", "index": found.start()},
        )
    return text


def free_text(max_length: int, min_length: int | None = None) -> type[str]:
    """A free-text field type: its length checked first, then :func:`plain_text`."""
    limits = StringConstraints(min_length=min_length, max_length=max_length)
    return Annotated[str, limits, AfterValidator(plain_text)]  # type: ignore[return-value]


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

    prompt: free_text(100_000, 1) | None = Field(  # type: ignore[valid-type]
        None, description="free text; or give `findings`; " + TEXT_RULE
    )
    findings: list[str] | dict[str, dict[str, AttributeValue]] | None = Field(
        None,
        description="finding ids or CT-RATE names, optionally with attributes "
        "(e.g. {'pleural_effusion': {'laterality': 'left'}}); [] asks for a normal scan",
    )
    negative_prompt: free_text(100_000, 1) | None = Field(  # type: ignore[valid-type]
        None,
        description="what guidance steers away from; a prompt's own negations "
        "('no pleural effusion') are added to it; " + TEXT_RULE,
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
    prompt: free_text(100_000) = Field(  # type: ignore[valid-type]
        "", description="text to condition on (optional); " + TEXT_RULE
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent")
    steps: int | None = Field(None, ge=1, le=10_000, description="sampler steps")
    guidance: float | None = Field(None, ge=0, le=1_000, description="classifier-free guidance")
    scheduler: Literal["ddim", "ddpm", "rectified_flow"] | None = None
    model: str | None = Field(None, max_length=64, description="a model id from /v1/models")


class VolumeRequest(PreviewRequest):
    format: Literal["nifti", "npy", "zarr", "anatomy"] = Field(
        "nifti",
        description="nifti: .nii.gz int16 HU; npy: int16 HU; zarr: a zip store; anatomy: the "
        "volume's anatomy as a .nii.gz uint8 label map, its legend in X-Anatomy-Legend",
    )


def published_models(
    cfg: ServeConfig,
) -> tuple[type[PreviewRequest], type[VolumeRequest], type[SegmentationRequest]]:
    """The request models with this server's limits and model ids in their schema, so that
    ``/openapi.json`` (and clients generated from it) say what the server accepts."""
    limits = cfg.limits
    ids = Literal[tuple(cfg.models)]  # type: ignore[valid-type]
    text = f"at most {limits.max_prompt_chars} characters; {TEXT_RULE}"
    fields = {
        "steps": (int | None, Field(None, ge=1, le=limits.max_steps, description="sampler steps")),
        "guidance": (float | None, Field(None, ge=0, le=limits.max_guidance)),
        "model": (ids | None, Field(None, description="a model id from /v1/models")),
    }
    prompt = free_text(limits.max_prompt_chars, 1) | None
    prompts = {
        "prompt": (prompt, Field(None, description=text)),
        "negative_prompt": (
            prompt,
            Field(None, description="what guidance steers away from, " + text),
        ),
    }
    return (
        create_model("PreviewBody", __base__=PreviewRequest, **fields, **prompts),
        create_model("VolumeBody", __base__=VolumeRequest, **fields, **prompts),
        create_model(
            "SegmentationBody",
            __base__=SegmentationRequest,
            **fields,
            prompt=(free_text(limits.max_prompt_chars), Field("", description=text)),
        ),
    )


@dataclass(frozen=True)
class Job:
    """A validated request for the generator deployment. Its masks and image travel as the
    base64 text they came in (compact), decoded by the replica, which knows the model grid."""

    model: str
    request: Request
    output: str  # nifti, npy, zarr, png, anatomy or segmentation
    masks: dict[str, str] = dataclasses.field(default_factory=dict)  # channel -> base64 .npy
    image: str | None = None  # base64 .npy of HU


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


def decode_mask(name: str, text: str, grid: tuple[int, ...]) -> np.ndarray:
    """A base64 .npy (optionally gzipped) 0/1 array on ``grid``; errors name ``masks.NAME``."""
    field = f"masks.{name}"
    mask = decode_npy(field, text, grid, "biu")
    if not np.isin(mask, (0, 1)).all():
        raise FieldError(field, "values must be 0 or 1")
    return mask.astype(bool)


def decode_image(text: str, grid: tuple[int, ...]) -> np.ndarray:
    """A base64 .npy (optionally gzipped) array of finite HU on ``grid``; errors name ``image``."""
    image = decode_npy("image", text, grid, "iuf")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise FieldError("image", "values must be finite")
    return image.astype(np.float32)


def decode_npy(field: str, text: str, shape: tuple[int, ...], kinds: str) -> np.ndarray:
    """A base64 .npy, optionally gzipped, of ``shape`` and a dtype of one of ``kinds``. Its
    header is checked before any data is read, and no more is inflated than the data it
    declares: a huge declared shape or a gzip bomb is refused, never inflated."""
    stream = npy_stream(field, text)
    head = io.BytesIO(read_stream(field, stream, NPY_HEAD_BYTES))
    given, fortran, dtype = npy_header(field, head)
    if given != tuple(shape):
        raise FieldError(field, f"shape {given} does not match the model grid {tuple(shape)}")
    if dtype.kind not in kinds or dtype.itemsize > 8:
        valid = ", ".join(KIND_NAMES[k] for k in kinds)
        raise FieldError(field, f"dtype {dtype} is not accepted; valid: {valid} (8 bytes at most)")
    size = math.prod(shape) * dtype.itemsize
    data = head.read()
    if len(data) <= size:  # one byte more than declared tells trailing data apart
        data += read_stream(field, stream, size - len(data) + 1)
    if len(data) != size:
        held = "more" if len(data) > size else str(len(data))
        raise FieldError(
            field, f"the header declares {size} bytes of data, the stream holds {held}"
        )
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def npy_stream(field: str, text: str) -> io.BufferedIOBase:
    """The bytes of base64 ``text``, inflated lazily (as they are read) when gzipped."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None
    if raw[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=io.BytesIO(raw))
    return io.BytesIO(raw)


def read_stream(field: str, stream: io.BufferedIOBase, size: int) -> bytes:
    """At most ``size`` bytes of ``stream``; a damaged gzip stream is refused naming ``field``."""
    try:
        return stream.read(size)
    except (OSError, EOFError, zlib.error):
        raise FieldError(field, "not a valid gzip stream") from None


def npy_header(field: str, head: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a .npy header (format 1.0 or 2.0), never unpickling."""
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    try:
        return readers[npy_format.read_magic(head)](head)
    except (KeyError, ValueError, tokenize.TokenError):  # TokenError: numpy's header filter
        raise FieldError(field, "not a .npy array (np.save output, format 1.0 or 2.0)") from None


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


def with_arrays(job: Job, grid: tuple[int, ...]) -> Job:
    """``job`` with its masks and image decoded on the model's ``grid`` into its request."""
    if not job.masks and job.image is None:
        return job
    masks = {name: decode_mask(name, text, grid) for name, text in job.masks.items()} or None
    image = decode_image(job.image, grid) if job.image is not None else None
    request = dataclasses.replace(job.request, masks=masks, image=image)
    return Job(job.model, request, job.output)


def resolve(body: PreviewRequest | SegmentationRequest, cfg: ServeConfig, output: str) -> Job:
    """Apply the configured limits and defaults: the job for the generator deployment."""
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
        prompt, negative, masks, image = body.prompt, "", {}, body.image
    else:
        if body.findings is not None:
            prompt = findings_prompt(body.findings, body.age, body.sex, seed)
        else:
            prompt = body.prompt or ""
        negative, masks, image = body.negative_prompt or "", body.masks or {}, None
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limits.max_prompt_chars:
            n = limits.max_prompt_chars
            raise FieldError(name, f"{len(text)} characters; this server takes at most {n}")
    request = Request(prompt, seed, steps, guidance, body.scheduler, negative_prompt=negative)
    return Job(model, request, output, masks, image)
