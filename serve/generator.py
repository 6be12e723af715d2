"""The generator deployment: models multiplexed by id, concurrent requests batched.

:func:`run_batch` is the plain-Python core (one loaded ``Generator``, a list of jobs, one
result each), testable without Ray; :class:`GeneratorDeployment` adds Ray Serve's model
multiplexing (loaded on demand, least recently used evicted) and ``@serve.batch``, with two
batches in flight: one samples while the one before it is encoded (NIfTI's gzip of a
512x512x128 volume takes seconds), as the factory's actors overlap sampling and writing.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import torch
from ray import serve

from factory.anatomy import pack_channels
from factory.data.nifti import nifti_bytes
from factory.models.checkpoint import CheckpointError
from factory.models.generator import Generator, RequestError
from factory.raycluster import IN_FLIGHT  # as an actor: one batch samples, one is encoded
from serve.config import ServeConfig, parse_serve_config
from serve.encode import MEDIA_TYPES, SUFFIXES, npy_bytes, preview_png, zarr_zip_bytes
from serve.schemas import FieldError, Job, volume_id, with_arrays

_FIELD = re.compile(r"^request \d+: ([A-Za-z_][\w.]*): (.*)$", re.S)


@dataclass
class Result:
    """One response: a body with its headers, or an error naming a field."""

    status: int = 200
    body: bytes = b""
    media_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    field: str | None = None


def load_serving_generator(ref: str, cfg: ServeConfig) -> Generator:
    """Load a model; refuse one whose grid exceeds the configured voxel limit."""
    generator = Generator.load(ref, **cfg.storage_options)
    voxels = 1
    for n in generator.config.size:
        voxels *= int(n)
    if voxels > cfg.limits.max_voxels:
        raise CheckpointError(
            f"{ref}: grid {tuple(generator.config.size)} has {voxels} voxels; this server's "
            f"limit is limits.max_voxels = {cfg.limits.max_voxels}"
        )
    return generator


def _request_error(exc: RequestError) -> Result:
    match = _FIELD.match(str(exc))
    if match is None:
        return Result(status=422, error=str(exc))
    return Result(status=422, error=f"{match.group(1)}: {match.group(2)}", field=match.group(1))


def header_text(text: str) -> str:
    """Free text as a header value: percent-encoded UTF-8, common punctuation left readable."""
    return quote(text, safe=" ,.:;()-'/")


def encode(generator: Generator, model_id: str, job: Job, volume) -> Result:
    """The response body for one generated volume, with its provenance in headers."""
    vid = volume_id(generator.model_hash, job.request)
    record = {
        "volume_id": vid,
        "model": model_id,
        "model_hash": generator.model_hash,
        "prompt": volume.prompt,
        "seed": volume.seed,
        **volume.sampler,
    }
    if job.output == "png":
        body = preview_png(volume, f"seed {volume.seed} | {volume.prompt}")
    elif job.output == "nifti":
        body = nifti_bytes(np.asarray(volume.hu, np.int16), volume.affine)
    elif job.output == "npy":
        body = npy_bytes(volume)
    elif job.output in LABEL_MAPS:  # the sampled anatomy, one label map and its legend
        labels, legend = pack_channels(volume.masks)
        body = nifti_bytes(labels, volume.affine)
    else:
        body = zarr_zip_bytes(volume, vid, generator.config.hu_window, record)
    headers = {
        "X-Volume-Id": vid,
        "X-Seed": str(volume.seed),
        "X-Model": model_id,
        "X-Model-Hash": generator.model_hash,
        "X-Prompt": header_text(volume.prompt),
        "X-Steps": str(volume.sampler["steps"]),
        "X-Guidance": str(volume.sampler["guidance"]),
        "X-Scheduler": str(volume.sampler["scheduler"]),
        "X-Shape": ",".join(str(n) for n in volume.hu.shape),
        "X-Spacing-Mm": ",".join(f"{s:g}" for s in volume.spacing),
        "Content-Disposition": f'attachment; filename="{vid}{SUFFIXES[job.output]}"',
    }
    if volume.masks:  # what format: anatomy would return for this volume
        headers["X-Anatomy"] = ",".join(volume.masks)
    if job.output in LABEL_MAPS:
        headers["X-Anatomy-Legend"] = json.dumps({str(k): v for k, v in legend.items()})
    if "negative_prompt" in volume.sampler:  # what guidance steered away from
        headers["X-Negative-Prompt"] = header_text(volume.sampler["negative_prompt"])
    return Result(body=body, media_type=MEDIA_TYPES[job.output], headers=headers)


LABEL_MAPS = ("segmentation", "anatomy")  # outputs that are the anatomy's label map


def run_batch(
    generator: Generator, model_id: str, jobs: list[Job], sampling: threading.Lock | None = None
) -> list[Result]:
    """Generate ``jobs`` on one model in as few forward passes as their settings allow. Their
    masks and images are decoded here, on the model's grid. The sampling holds ``sampling``
    (one batch on the accelerator at a time); decoding and encoding do not, so that another
    batch samples meanwhile."""
    grid = tuple(int(n) for n in generator.config.size)
    results: list[Result | None] = [None] * len(jobs)
    jobs, valid = list(jobs), []
    for i, job in enumerate(jobs):
        try:
            jobs[i] = with_arrays(job, grid)
            generator.check(jobs[i].request, i)
            if job.output == "anatomy" and not generator.config.diffusion.anatomy_channels:
                raise FieldError("format", f"the model {model_id} makes no anatomy masks")
            valid.append(i)
        except FieldError as exc:
            results[i] = Result(status=422, error=str(exc), field=exc.field)
        except RequestError as exc:
            results[i] = _request_error(exc)
    if valid:
        with sampling or nullcontext():
            start = time.perf_counter()
            volumes = generator.generate([jobs[i].request for i in valid], batch_size=len(valid))
            seconds = time.perf_counter() - start
        for i, volume in zip(valid, volumes, strict=True):
            result = encode(generator, model_id, jobs[i], volume)
            result.headers["X-Batch-Size"] = str(len(valid))
            result.headers["X-Generate-Seconds"] = f"{seconds:.3f}"
            results[i] = result
    return results  # type: ignore[return-value]


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Holds up to ``max_models_per_replica`` generators; the default model loads first."""

    def __init__(self, config: dict):
        self.cfg = parse_serve_config(config)
        if not torch.cuda.is_available():  # Ray starts actors with one thread
            torch.set_num_threads(max(1, round(self.cfg.cpus_per_replica)))
        self.batch_sizes: Counter[int] = Counter()
        self.loads: Counter[str] = Counter()
        self._sampling = threading.Lock()
        self.generate.set_max_batch_size(self.cfg.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)
        default = self.cfg.default_model
        self._preloaded = {default: load_serving_generator(self.cfg.models[default], self.cfg)}
        self.default_hash = self._preloaded[default].model_hash

        self.loads[default] += 1

        async def load(model_id: str) -> Generator:
            preloaded = self._preloaded.pop(model_id, None)
            if preloaded is not None:
                return preloaded
            self.loads[model_id] += 1
            return await asyncio.to_thread(
                load_serving_generator, self.cfg.models[model_id], self.cfg
            )

        # Wired per instance so that the limit comes from the config (Serve supports this).
        self.model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(
            load
        )

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=IN_FLIGHT)
    async def generate(self, jobs: list[Job]) -> list[Result]:
        """Concurrent calls arrive here together; each model's share runs as one batch."""
        self.batch_sizes[len(jobs)] += 1
        by_model: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(i)
        results: list[Result | None] = [None] * len(jobs)
        for model_id, members in by_model.items():
            try:
                generator = await self.model(model_id)
            except CheckpointError as exc:
                for i in members:
                    results[i] = Result(status=503, error=f"model {model_id}: {exc}")
                continue
            share = [jobs[i] for i in members]
            out = await asyncio.to_thread(run_batch, generator, model_id, share, self._sampling)
            for i, result in zip(members, out, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def stats(self) -> dict:
        """Batch sizes and model loads seen by this replica (readiness, tests, benchmarks)."""
        return {
            "default_model_hash": self.default_hash,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "model_loads": dict(self.loads),
            "torch_threads": torch.get_num_threads(),
        }
