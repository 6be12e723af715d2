"""The HTTP API: a FastAPI app over a generator backend, and the Ray Serve application.

:func:`make_api` builds the FastAPI app from a config and a :class:`Backend` (plain Python,
testable without Ray). :func:`build_app` is the Ray Serve application builder named by
serve/config.yaml: an ingress deployment (``Api``) in front of the generator deployment.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from factory import vocab
from factory.models.checkpoint import CheckpointError, describe
from factory.raycluster import cluster_has_gpus
from factory.viewer import STATIC as VIEWER_STATIC
from serve.config import ServeConfig, parse_serve_config
from serve.generator import GeneratorDeployment, Result
from serve.schemas import (
    FieldError,
    Job,
    PreviewRequest,
    SegmentationRequest,
    VolumeRequest,
    published_models,
    resolve,
)

STATIC = Path(__file__).parent / "static"
API_KEY_HEADER = "X-API-Key"


class Busy(Exception):
    """The generator's queue is full: answered with 503 and Retry-After."""


class ReplicaLost(Exception):
    """The replica running the job died (its node was lost): 503 and Retry-After, while Serve
    starts a replacement."""


REPLACEMENT_S = 15  # Retry-After floor for a lost replica: a new one loads the model first


class Backend(Protocol):
    """Where jobs run: the generator deployment, or an in-process generator in tests."""

    async def generate(self, job: Job) -> Result: ...

    async def ready(self) -> dict: ...


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    errors: list[dict[str, Any]] = []


def error(
    status: int, message: str, field: str | None = None, retry_after: str | None = None, **extra
) -> JSONResponse:
    """The JSON error body every 4xx and 5xx carries: ``error``, ``field`` and more."""
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse({"error": message, "field": field, **extra}, status, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 and one not received within
    ``timeout_s`` gets 408 (a client that trickles it or stops), before any route parses it."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await error(400, "invalid Content-Length", "body")(scope, receive, send)
        if declared is not None and int(declared) > self.limit:
            return await self.too_large()(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self.read(receive)
        except TimeoutError:
            message = f"request body not received within {self.timeout_s:g} s"
            return await closing(error(408, message, "body"))(scope, receive, send)
        if body is None:  # the client went away
            return None
        if len(body) > self.limit:
            return await self.too_large()(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def read(self, receive) -> bytes | None:
        """The body, cut short once past the limit; None when the client disconnected."""
        chunks, size, more = [], 0, True
        while more and size <= self.limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self) -> JSONResponse:
        """413, naming the limit."""
        return closing(error(413, f"request body over {self.limit} bytes", "body"))


def closing(response: JSONResponse) -> JSONResponse:
    """``response`` closing its connection: what is left of the body is never read."""
    response.headers["Connection"] = "close"
    return response


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            errors.append({"field": "body", "message": f"malformed JSON: {e.get('msg')}"})
        else:
            errors.append({"field": _field(loc), "message": e.get("msg", "invalid")})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return error(422, f"{first['field']}: {first['message']}", first["field"], errors=errors)


def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    field = "body" if exc.status_code == 400 else None  # FastAPI's 400: a body it cannot parse
    return error(exc.status_code, str(exc.detail), field)


def _response(result: Result) -> Response:
    if result.status != 200:
        return error(result.status, result.error, result.field)
    return Response(result.body, media_type=result.media_type, headers=result.headers)


FILE_RESPONSES = {
    400: {"model": ErrorBody, "description": "the body could not be read (not UTF-8 JSON)"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    408: {"model": ErrorBody, "description": "the body did not arrive within the body timeout"},
    413: {"model": ErrorBody, "description": "request body too large"},
    422: {"model": ErrorBody, "description": "a field is invalid; `field` names it"},
    503: {
        "model": ErrorBody,
        "description": "the queue is full, or the replica was lost; retry after Retry-After s",
    },
    504: {"model": ErrorBody, "description": "generation exceeded the request timeout"},
}


def make_api(cfg: ServeConfig, backend: Backend, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: /v1 routes, health, the web page, limits and optional API key."""
    app = FastAPI(
        title="ct-factory",
        version="1",
        description="Text-conditioned synthetic 3D chest CT on demand. Research use only.",
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    limits = cfg.limits
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", API_KEY_HEADER],
            expose_headers=[
                "X-Volume-Id",
                "X-Seed",
                "X-Model-Hash",
                "X-Prompt",
                "X-Anatomy",
                "X-Anatomy-Legend",
            ],
        )
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)
    seconds = [5.0]  # recent generation time, for Retry-After

    def unauthorised() -> JSONResponse:
        message = f"missing or wrong API key in the {API_KEY_HEADER} header"
        response = error(401, message, API_KEY_HEADER)
        response.headers["WWW-Authenticate"] = API_KEY_HEADER
        return response

    def authorised(given: str | None) -> bool:
        return api_key is None or (
            given is not None and hmac.compare_digest(given.encode(), api_key.encode())
        )

    async def run(
        body: PreviewRequest | SegmentationRequest, output: str, given: str | None
    ) -> Response:
        if not authorised(given):
            return unauthorised()
        try:
            job = resolve(body, cfg, output)
        except FieldError as exc:
            return error(422, str(exc), exc.field)
        try:
            result = await asyncio.wait_for(backend.generate(job), cfg.limits.request_timeout_s)
        except Busy:
            retry = str(max(1, math.ceil(seconds[0])))
            return error(503, "the generator queue is full; retry later", retry_after=retry)
        except ReplicaLost:
            retry = str(max(REPLACEMENT_S, math.ceil(seconds[0])))
            message = "the generator replica was lost (its node went away); retry later"
            return error(503, message, retry_after=retry)
        except TimeoutError:
            limit = cfg.limits.request_timeout_s
            return error(504, f"generation took longer than the {limit:g} s request timeout")
        if "X-Generate-Seconds" in result.headers:
            seconds[0] = 0.8 * seconds[0] + 0.2 * float(result.headers["X-Generate-Seconds"])
        return _response(result)

    preview_body, volume_body, segmentation_body = published_models(cfg)

    async def volumes(body: VolumeRequest, key: str | None = Security(key_header)) -> Response:
        return await run(body, body.format, key)

    async def previews(body: PreviewRequest, key: str | None = Security(key_header)) -> Response:
        return await run(body, "png", key)

    async def segmentations(
        body: SegmentationRequest, key: str | None = Security(key_header)
    ) -> Response:
        return await run(body, "segmentation", key)

    # The published bodies carry this server's limits (annotations are strings here).
    volumes.__annotations__["body"] = volume_body
    previews.__annotations__["body"] = preview_body
    segmentations.__annotations__["body"] = segmentation_body

    app.post(
        "/v1/volumes",
        response_class=Response,
        responses={
            200: {
                "description": "the volume; provenance in X-Volume-Id, X-Seed, X-Model-Hash, "
                "X-Prompt (percent-encoded) and more X- headers",
                "content": {
                    "application/gzip": {},
                    "application/octet-stream": {},
                    "application/zip": {},
                },
            },
            **FILE_RESPONSES,
        },
        summary="Generate one volume (NIfTI, .npy or a Zarr zip)",
    )(volumes)
    app.post(
        "/v1/segmentations",
        response_class=Response,
        responses={
            200: {
                "description": "the anatomy sampled for the given CT: a uint8 label map "
                "(.nii.gz) on the model grid, its legend in X-Anatomy-Legend",
                "content": {"application/gzip": {}},
            },
            **FILE_RESPONSES,
        },
        summary="Segment a CT by generation: its anatomy channels sampled with it held fixed",
    )(segmentations)
    app.post(
        "/v1/previews",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "PNG"}, **FILE_RESPONSES},
        summary="Generate one volume and return a three-plane PNG preview",
    )(previews)

    cards: dict[str, dict] = {}

    @app.get(
        "/v1/models",
        summary="Models served: ids, content hashes and model cards",
        responses={401: FILE_RESPONSES[401]},
    )
    async def models(key: str | None = Security(key_header)) -> JSONResponse:
        if not authorised(key):
            return unauthorised()
        out = []
        for mid, ref in cfg.models.items():
            if mid not in cards:
                try:
                    card, digest = await asyncio.to_thread(describe, ref, cfg.storage_options)
                    cards[mid] = {"hash": digest, "card": json.loads(json.dumps(card.__dict__))}
                except CheckpointError as exc:
                    out.append({"id": mid, "default": mid == cfg.default_model, "error": str(exc)})
                    continue
            out.append({"id": mid, "default": mid == cfg.default_model, **cards[mid]})
        return JSONResponse({"models": out})

    @app.get("/v1/findings", summary="The finding vocabulary: ids, CT-RATE names, attributes")
    async def findings() -> JSONResponse:
        return JSONResponse(
            {
                "findings": [
                    {"id": f.id, "name": f.column, "attributes": list(f.attributes)}
                    for f in vocab.FINDINGS
                ]
            }
        )

    @app.get("/healthz", summary="Liveness: the HTTP front end answers")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Readiness: a generator replica holds the default model")
    async def readyz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(backend.ready(), 5.0)
        except Exception as exc:  # not ready, whatever the reason: say so, never a 500
            return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", **info})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/viewer", StaticFiles(directory=VIEWER_STATIC), name="viewer")  # NiiVue, offline
    return app


class RayBackend:
    """Jobs go to the generator deployment, routed to a replica holding their model."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, job: Job) -> Result:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.handle.options(multiplexed_model_id=job.model).generate.remote(job)
        except BackPressureError:
            raise Busy from None
        except RayActorError:  # died with its node, or unreachable: Serve replaces it
            raise ReplicaLost from None

    async def ready(self) -> dict:
        return await self.handle.stats.remote()


INGRESS_CPUS = 0.1  # the ingress only parses and forwards: leave the cores to the generators


@serve.deployment(
    name="Api", max_ongoing_requests=256, ray_actor_options={"num_cpus": INGRESS_CPUS}
)
@serve.ingress()
class Api:
    """The HTTP front end; its FastAPI app is built on the replica from the config."""

    def __init__(self, generator: DeploymentHandle, config: dict):
        self.cfg = parse_serve_config(config)
        self.backend = RayBackend(generator)
        env = self.cfg.api_key_env
        self.api_key = (os.environ.get(env) or None) if env else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.cfg, self.backend, self.api_key)


def gpus_per_replica(cfg: ServeConfig) -> float:
    """``auto``: one GPU per generator replica when the connected cluster has GPUs."""
    if cfg.gpus_per_replica != "auto":
        return float(cfg.gpus_per_replica)
    return 1.0 if cluster_has_gpus() else 0.0


def build_app(args: dict) -> Application:
    """The Ray Serve application (``import_path: serve.app:build_app`` in serve/config.yaml)."""
    cfg = parse_serve_config(args, "serve application args")
    scaling = cfg.autoscaling
    replicas: dict[str, Any] = (
        {"num_replicas": scaling.min_replicas}
        if scaling.min_replicas == scaling.max_replicas
        else {"autoscaling_config": scaling.model_dump()}
    )
    config = cfg.model_dump(mode="json")
    api = Api
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if key:  # the replica may run on another node: hand it the key the builder was given
        env = {"env_vars": {cfg.api_key_env: key}}
        api = Api.options(ray_actor_options={"num_cpus": INGRESS_CPUS, "runtime_env": env})
    generator = GeneratorDeployment.options(
        max_ongoing_requests=cfg.limits.max_ongoing_requests,
        max_queued_requests=cfg.limits.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus_per_replica(cfg)},
        **replicas,
    ).bind(config)
    return api.bind(generator, config)
