"""The serving config: which models, batching, limits, auth and autoscaling.

One validated model, loaded from the ``args`` of a Ray Serve config file (serve/config.yaml)
or built from defaults; ``ctfactory serve``, ``serve run`` and ``serve deploy`` all read it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.errors import CtFactoryError

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeConfigError(CtFactoryError, ValueError):
    """A serving config that cannot be used; the message names the file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(Strict):
    """``@serve.batch``: concurrent requests for one model share a forward pass."""

    max_batch_size: int = Field(4, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)


class Limits(Strict):
    """What one request may ask for, and how much work may wait (excess gets 503)."""

    max_steps: int = Field(100, ge=1)
    default_steps: int | None = Field(None, ge=1)  # None: each model's own (diffusion.sampling)
    max_guidance: float = Field(20.0, ge=0)
    default_guidance: float | None = Field(None, ge=0)  # None: each model's own
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)  # masks travel base64-encoded
    body_timeout_s: float = Field(60.0, gt=0)  # to receive the whole body (408 after it)
    max_voxels: int = Field(512**3, ge=1)  # a model whose grid is larger is refused at load
    max_ongoing_requests: int = Field(8, ge=1)  # per generator replica (>= max_batch_size)
    max_queued_requests: int = Field(16, ge=0)  # per caller; 0 rejects whatever cannot start
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _defaults_in_range(self) -> Limits:
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} > max_steps {self.max_steps}")
        if self.default_guidance is not None and self.default_guidance > self.max_guidance:
            raise ValueError(
                f"default_guidance {self.default_guidance} > max_guidance {self.max_guidance}"
            )
        return self


class Autoscaling(Strict):
    """Ray Serve autoscaling of the generator deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(Strict):
    """Everything the application needs; defaults serve ``builtin:demo`` on one CPU replica."""

    models: dict[str, str] = Field(default_factory=lambda: {"demo": "builtin:demo"})
    default_model: str = "demo"
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec, for s3:// models
    max_models_per_replica: int = Field(2, ge=1)  # least recently used are evicted
    batching: Batching = Batching()
    limits: Limits = Limits()
    autoscaling: Autoscaling = Autoscaling()
    gpus_per_replica: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs
    cpus_per_replica: float = Field(2.0, gt=0)  # on CPU also the replica's torch threads
    api_key_env: str | None = "CTFACTORY_API_KEY"  # when that variable is set, keys are required
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are listed

    @model_validator(mode="after")
    def _models(self) -> ServeConfig:
        if not self.models:
            raise ValueError("models: at least one model id -> checkpoint reference")
        for mid in self.models:
            if not MODEL_ID.match(mid):
                raise ValueError(
                    f"models: id {mid!r} is not valid; use letters, digits, '.', '_' or '-'"
                )
        if self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not in models ({', '.join(self.models)})"
            )
        if self.limits.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"limits.max_ongoing_requests {self.limits.max_ongoing_requests} < "
                f"batching.max_batch_size {self.batching.max_batch_size}: batches could not fill"
            )
        return self


def parse_serve_config(data: Any, source: str = "serve config") -> ServeConfig:
    """Validate a mapping; errors name ``source`` and the key path."""
    try:
        return ServeConfig.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ServeConfigError(f"{source}: {key}: {first['msg']}") from None


def read_app_args(path: str | Path) -> tuple[dict, dict]:
    """The first application of a Ray Serve config file: (its ``args``, the whole app entry)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ServeConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ServeConfigError(f"{path}: not valid YAML: {exc}") from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise ServeConfigError(
            f"{path}: expected a Ray Serve config with 'applications: [{{import_path, args}}]'"
        )
    return dict(apps[0].get("args") or {}), apps[0]


def load_serve_config(path: str | Path) -> ServeConfig:
    """The ServeConfig in the ``args`` of a Ray Serve config file."""
    args, _ = read_app_args(path)
    return parse_serve_config(args, f"{path}: applications[0].args")
