"""Training configuration: one validated tree per run, loaded from YAML with command-line overrides.

``train/configs/*.yaml`` hold the recipes; ``load_train_config(path, overrides)`` applies
``key=value`` overrides (dotted keys, YAML values) and validates the whole tree, so an unknown key
or an out-of-range value is an error that names the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import CtFactoryError
from factory.models.config import ModelConfig, VAEConfig, load_config, presets
from factory.raycluster import parse_workers
from factory.refs import absolute

TASKS: tuple[str, ...] = ("vae", "clip", "diffusion", "classifier")
Task = Literal["vae", "clip", "diffusion", "classifier"]


class TrainConfigError(CtFactoryError, ValueError):
    """A training config that cannot be used; the message names the file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataOptions(Strict):
    """A CT-RATE-layout dataset (real CT-RATE or the phantom) on local disk."""

    root: str
    split: tuple[str, ...] = ("train",)  # one split, or several trained on together
    # Split(s) for evaluation (CLIP retrieval, VAE reconstruction, classifier AUC), each cut to
    # its first ``held_out_limit`` volumes.
    held_out: tuple[str, ...] = ()
    held_out_limit: int = Field(64, ge=2)
    # What a volume's text is: its report (findings + impression), its impression, or a mix of
    # those and a structured "{age} years old {sex}: {impression}" prompt, drawn per sample.
    text: Literal["report", "impression", "mixed"] = "report"
    # Chance that a sample's text is instead 1-3 sentences of its report, so that short prompts
    # and single pertinent negatives ("no pleural effusion") are learned (train/data.excerpt).
    excerpts: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_buffer: int = Field(16, ge=1)  # per-worker local shuffle, reseeded every epoch
    # Keep the preprocessed dataset in Ray's object store after the first pass, so that later
    # epochs do not read and preprocess it again: "auto" when it fits in a quarter of the store.
    cache: Literal["auto", "always", "never"] = "auto"

    @field_validator("split", "held_out", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else value


class OptimOptions(Strict):
    """AdamW with linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""

    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 turns clipping off


class AdversarialOptions(Strict):
    """A patch discriminator for the VAE (as MAISI trains its VAE): L1 alone decodes the median,
    which erases texture finer than a latent voxel (emphysema's low-attenuation speckle)."""

    weight: float = Field(0.1, gt=0)  # of the decoder's least-squares adversarial loss
    # Steps of reconstruction-only training before the decoder feels the discriminator (which
    # trains from the start, so that it is a useful critic when it joins).
    start: int = Field(0, ge=0)
    # The HU window the discriminator sees (None: the model's whole window). A narrow lung
    # window puts its attention on the texture of the parenchyma.
    window: tuple[float, float] | None = None
    channels: int = Field(32, ge=4)
    layers: int = Field(3, ge=1, le=5)

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"window {list(value)}: the low end must be below the high end")
        return value


class VAEOptions(Strict):
    """VAE task: L1 reconstruction + KL (+ optional adversarial loss), on random crops (the
    network is fully convolutional)."""

    crop: tuple[int, int, int] | None = None  # None: whole volumes
    kl_weight: float = Field(1e-6, ge=0)
    adversarial: AdversarialOptions | None = None


class CLIPOptions(Strict):
    """CLIP task: symmetric InfoNCE; the text tower trains only when asked."""

    train_text: bool = False
    recall_k: tuple[int, ...] = (1, 5)


class ClassifierOptions(Strict):
    """Classifier task: multi-label BCE over the model's ``classifier.findings``."""

    flip: bool = True  # random left-right flips (labels say whether, not where)
    threshold: float = Field(0.5, gt=0, lt=1)  # for the precision it logs


class DiffusionOptions(Strict):
    """Diffusion task: latents from a trained VAE checkpoint, text from the configured encoder."""

    vae: str | None = None  # checkpoint reference (builtin:NAME, directory, URL) with a VAE
    clip: str | None = None  # optional checkpoint whose CLIP (and text tower) ships with the model
    latent_workers: int = Field(1, ge=1)  # actors of the latent precompute job
    # Where the encoded latents are kept (a path or URL every node reaches, with the run's
    # storage_options); default: {data.root}/latents.
    latent_cache: str | None = None
    text_cache: int = Field(4096, ge=0)  # frozen-encoder outputs kept per worker (0: off)


class TrainConfig(Strict):
    """A whole training run: task, model, data, optimisation, checkpoints, scaling."""

    task: Task
    model: str = "tiny"  # a model preset or a model-config YAML path
    data: DataOptions
    name: str | None = None  # run name under ``storage`` (default: the task)
    storage: str = "runs"  # local path, file:// or s3:// URL
    storage_options: dict = Field(default_factory=dict)  # fsspec options, e.g. endpoint_url
    workers: str = "1"  # N, or MIN-MAX for elastic training
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    # Ray resources each worker asks for besides its CPU or GPU: a node group's custom
    # resource, say {"trainer": 1}, keeps workers on that group (and off a CPU head).
    worker_resources: dict[str, float] = Field(default_factory=dict)
    # How often a running elastic run looks for room to grow (Ray Train's
    # elastic_resize_monitor_interval_s); a lost worker shrinks it at once.
    elastic_check_s: float = Field(60.0, gt=0)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # global: constant whatever the number of workers
    micro_batch: int = Field(8, ge=1)  # at most this many samples per forward pass
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    optim: OptimOptions = OptimOptions()
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)  # checkpoints kept
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate at checkpoints only
    max_failures: int = Field(3, ge=0)  # worker-group restarts after worker or node loss
    vae: VAEOptions = VAEOptions()
    clip: CLIPOptions = CLIPOptions()
    diffusion: DiffusionOptions = DiffusionOptions()
    classifier: ClassifierOptions = ClassifierOptions()

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> str:
        parse_workers(str(value))
        return str(value)

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: object) -> object:
        """Local paths become absolute here, on the driver: workers run in other folders."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("data"), dict) and isinstance(data["data"].get("root"), str):
            data["data"] = {**data["data"], "root": absolute(data["data"]["root"])}
        if isinstance(data.get("storage"), str):
            data["storage"] = absolute(data["storage"])
        if isinstance(data.get("model"), str) and data["model"] not in presets():
            data["model"] = absolute(data["model"])
        if isinstance(data.get("diffusion"), dict):
            data["diffusion"] = {
                k: absolute(v) if k in ("vae", "clip") and isinstance(v, str) else v
                for k, v in data["diffusion"].items()
            }
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        lo, hi = parse_workers(self.workers)
        bad = [w for w in range(lo, hi + 1) if self.batch_size % w]
        if bad:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by every number of workers "
                f"({self.workers}), so the global batch stays constant; not by {bad}"
            )
        if self.task == "diffusion" and not self.diffusion.vae:
            raise ValueError("diffusion.vae: the diffusion task needs a VAE checkpoint")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.', '-'")
        return self

    @property
    def run_name(self) -> str:
        return self.name or self.task

    @property
    def run_url(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.run_name}"

    def architecture(self) -> ModelConfig:
        return load_config(self.model)

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this config to be resumed by it."""
        fingerprint = {
            "task": self.task,
            "model": self.architecture().model_dump(mode="json"),
            "data": {"root": self.data.root, "split": list(self.data.split)},
            "diffusion": self.diffusion.model_dump(mode="json") if self.task == "diffusion" else {},
            "train_text": self.clip.train_text if self.task == "clip" else False,
        }
        if self.task == "vae" and self.vae.adversarial:
            fingerprint["vae_adversarial"] = True
        return without_runtime(fingerprint)


def without_runtime(fingerprint: dict) -> dict:
    """``fingerprint`` less the VAE's run-time settings (how to decode, not what was trained),
    which checkpoints before them recorded."""
    vae = (fingerprint.get("model") or {}).get("vae")
    if not isinstance(vae, dict):
        return fingerprint
    kept = {k: v for k, v in vae.items() if k not in VAEConfig.RUNTIME}
    return {**fingerprint, "model": {**fingerprint["model"], "vae": kept}}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "workers=2-4"]`` applied to a config mapping (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 3e-4 as a string
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def parse_train_config(data: object, source: str = "<config>") -> TrainConfig:
    """Validate a mapping; errors name ``source`` and every bad field's dotted path."""
    try:
        config = TrainConfig.model_validate(data)
        config.architecture()  # the model reference must load too
        return config
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise TrainConfigError(f"{source}: {problems}") from None
    except ValueError as exc:  # the model config
        raise TrainConfigError(f"{source}: model: {exc}") from None


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML, apply overrides, validate; relative data paths stay as written."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such training config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    return parse_train_config(apply_overrides(data, overrides or []), str(path))
