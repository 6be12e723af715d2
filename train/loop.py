"""The training loop every task shares, and the training state a checkpoint holds.

A task (``train/vae.py``, ``train/clip.py``, ``train/diffusion.py``) supplies a model, a loss on
one micro-batch and an evaluation; :func:`fit` does the rest: gradient accumulation so that the
global batch is the same on any number of workers, mixed precision on GPU, clipping, AdamW
with warm-up and cosine decay, EMA, metrics, checkpoints and exact resumption.

Resumption is exact because nothing random is carried in hidden state: each micro-batch's
random draws come from a generator seeded by (seed, step, rank, micro-batch), each epoch's
order from (seed, epoch), and a checkpoint records the step, the epoch and the position in it.
A :class:`Session` is the world around the loop: Ray Train (``train.session.RaySession``) or
a single local process (``train.session.LocalSession``, for tests and debugging).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from factory.errors import CtFactoryError
from train.config import TrainConfig, without_runtime

STATE_FILE = "state.pt"  # torch.save; read back with weights_only=True (no arbitrary unpickling)
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = 1


class ResumeError(CtFactoryError, ValueError):
    """A checkpoint that this config cannot continue (other task, model or data)."""


class Session(Protocol):
    """What the loop needs from its surroundings."""

    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def batches(self, epoch: int, micro_batch: int, seed: int) -> Iterator[dict[str, Any]]: ...

    def restore(self) -> dict | None: ...

    def report(self, metrics: dict, files: dict[str, bytes] | None) -> None: ...

    def write(self, name: str, data: bytes) -> None: ...

    def all_mean(self, value: float) -> float: ...


class Task(Protocol):
    """One of vae, clip, diffusion, classifier: its model, the loss of a micro-batch at
    optimiser step ``step`` (for losses that change during training), evaluation and weights."""

    name: str

    def model(self) -> nn.Module: ...

    def loss(
        self, model: nn.Module, batch: dict, gen: torch.Generator, step: int
    ) -> torch.Tensor: ...

    def evaluate(self, module: nn.Module) -> dict[str, float]: ...

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]: ...


def rng_for(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and the stream coordinates."""
    value = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(value >> np.uint64(1)))


def accumulation(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for ``world_size`` workers at the global batch size."""
    per_worker, rest = divmod(cfg.batch_size, world_size)
    if rest or per_worker < 1:
        raise ValueError(
            f"batch_size {cfg.batch_size} cannot be split over {world_size} workers evenly"
        )
    micro = max(d for d in range(1, min(cfg.micro_batch, per_worker) + 1) if per_worker % d == 0)
    return micro, per_worker // micro


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to ``min_lr_ratio`` (or constant), as a factor of ``lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_decay(module: nn.Module, weight_decay: float, no_decay: set[str]) -> list[dict]:
    """AdamW groups: biases, norms, 1-d parameters and ``no_decay`` names are not decayed."""
    decay, keep = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (keep if p.ndim < 2 or name in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


class EMA:
    """Exponential moving average of a task's floating-point weights, with the usual warm-up
    (decay grows as (1 + n) / (10 + n) up to ``decay``)."""

    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in state.items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def apply_to(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the averaged values in place of the live ones."""
        return {k: self.shadow.get(k, v) for k, v in state.items()}


def precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision (always on CPU)."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    if cfg.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Position:
    """Where training is: optimiser steps done, epoch, steps done in that epoch."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0
    world_size: int = 0
    wall_s: float = 0.0
    restarts: int = 0  # times this run was restored from a checkpoint
    history: list[dict] = field(default_factory=list)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _meta(cfg: TrainConfig, pos: Position, extra: dict) -> dict:
    return {
        "format": FORMAT,
        "task": cfg.task,
        "step": pos.step,
        "epoch": pos.epoch,
        "in_epoch": pos.in_epoch,
        "world_size": pos.world_size,
        "wall_s": pos.wall_s,
        "restarts": pos.restarts,
        "fingerprint": cfg.fingerprint(),
        "config": cfg.model_dump(mode="json"),
        "extra": extra,
    }


def check_resumable(meta: dict, cfg: TrainConfig, where: str) -> None:
    """Refuse a checkpoint of another task, model config or dataset."""
    if meta.get("task") != cfg.task:
        raise ResumeError(
            f"{where}: is a checkpoint of task {meta.get('task')!r}, not {cfg.task!r}; "
            "choose another --name or --storage"
        )
    theirs, ours = without_runtime(meta.get("fingerprint", {})), cfg.fingerprint()
    differ = sorted(k for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise ResumeError(
            f"{where}: was trained with a different {', '.join(differ)}; a run resumes only "
            "with the config it started with (steps, workers and optimiser settings may change)"
        )


def metrics_jsonl(history: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode()


def _progress(cfg: TrainConfig, record: dict, rate: float) -> str:
    left = (cfg.steps - record["step"]) / rate if rate > 0 else float("nan")
    eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
    evals = "".join(f" {k} {v:.4g}" for k, v in record.items() if k.startswith("eval/"))
    return (
        f"[{cfg.task}] step {record['step']}/{cfg.steps} ({100 * record['step'] / cfg.steps:.0f}%)"
        f" loss {record['loss']:.4g} lr {record['lr']:.3g} grad {record['grad_norm']:.3g}"
        f"{evals} | {record['samples_per_s']:.2f} samples/s, {rate:.3g} steps/s, ETA {eta}"
    )


def fit(task: Task, cfg: TrainConfig, session: Session, rows: int, extra: dict) -> Position:
    """Train ``task`` to ``cfg.steps`` optimiser steps, resuming from the session's checkpoint.

    ``rows`` is the dataset length (for the number of steps per epoch); ``extra`` is recorded
    in every checkpoint (e.g. the latent set a diffusion run trained on).
    """
    torch.manual_seed(cfg.seed)  # initial weights: the same on every rank and every run
    module = task.model().to(session.device)
    ema = EMA(task.state_dict(module), cfg.ema_decay) if cfg.ema_decay else None
    model = session.prepare(module)
    opt = torch.optim.AdamW(
        task.param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    dtype = precision(cfg, session.device)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    pos = Position(world_size=session.world_size)

    saved = session.restore()
    if saved is not None:
        check_resumable(saved["meta"], cfg, "checkpoint")
        task.load_state_dict(module, saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        m = saved["meta"]
        pos = Position(m["step"], m["epoch"], m["in_epoch"], m["world_size"], m["wall_s"])
        pos.restarts = m.get("restarts", 0) + 1
        pos.history = saved["history"]
        if pos.world_size != session.world_size:
            if session.rank == 0:
                print(
                    f"[{cfg.task}] resized from {pos.world_size} to {session.world_size} workers "
                    f"at step {pos.step}: accumulation {accumulation(cfg, pos.world_size)[1]} -> "
                    f"{accumulation(cfg, session.world_size)[1]} (global batch {cfg.batch_size}); "
                    f"epoch {pos.epoch} restarts on the new shards",
                    flush=True,
                )
            pos.in_epoch, pos.world_size = 0, session.world_size
        elif session.rank == 0:
            print(f"[{cfg.task}] resumed at step {pos.step} (epoch {pos.epoch})", flush=True)

    micro, accum = accumulation(cfg, session.world_size)
    per_epoch = (rows // session.world_size // micro) // accum
    if per_epoch < 1:
        raise ValueError(
            f"data: {rows} volumes are too few for a global batch of {cfg.batch_size} "
            f"on {session.world_size} workers; lower batch_size or add data"
        )

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(session.device.type, dtype=dtype)

    def checkpoint(record: dict) -> None:
        files = None
        if session.rank == 0:
            state = {
                "model": task.state_dict(module),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "meta": _meta(cfg, pos, extra),
                "history": pos.history,
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            files = {
                STATE_FILE: buffer.getvalue(),
                META_FILE: json.dumps(state["meta"], indent=2).encode(),
                METRICS_FILE: metrics_jsonl(pos.history),
            }
            session.write(METRICS_FILE, files[METRICS_FILE])
        session.report(record, files)

    started = time.perf_counter()
    start_step = pos.step
    while pos.step < cfg.steps:
        model.train()
        for i, batch in enumerate(session.batches(pos.epoch, micro, cfg.seed)):
            if pos.step >= cfg.steps:
                break
            if i < pos.in_epoch * accum or i >= per_epoch * accum:
                continue  # consumed before a resume, or the epoch's remainder
            k = i % accum
            if k == 0:
                t0 = time.perf_counter()
                losses = []
            gen = rng_for(cfg.seed, pos.step, session.rank, k)
            sync = k == accum - 1
            ctx = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else None
            with ctx or model.no_sync(), autocast():
                loss = task.loss(model, batch, gen, pos.step)
            scaler.scale(loss / accum).backward()
            losses.append(float(loss.detach()))
            if not sync:
                continue
            scaler.unscale_(opt)
            limit = cfg.optim.grad_clip or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), limit))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            if ema is not None:
                ema.update(task.state_dict(module))
            pos.step += 1
            pos.in_epoch += 1
            dt = time.perf_counter() - t0
            pos.wall_s += dt
            record = {
                "step": pos.step,
                "epoch": pos.epoch,
                "loss": session.all_mean(sum(losses) / len(losses)),
                "lr": lr,
                "grad_norm": grad_norm,
                "step_s": dt,
                "samples_per_s": cfg.batch_size / dt,
                "world_size": session.world_size,
                "global_batch": session.world_size * micro * accum,  # batch_size, at any size
            }
            save = pos.step % cfg.checkpoint_every == 0 or pos.step == cfg.steps
            evaluate = save or (cfg.eval_every and pos.step % cfg.eval_every == 0)
            if evaluate and session.rank == 0:
                eval_module = _unwrap(model)
                live = {k: v.clone() for k, v in task.state_dict(module).items()} if ema else None
                if ema is not None:
                    task.load_state_dict(module, ema.apply_to(live))
                eval_module.eval()
                with torch.no_grad(), autocast():
                    record.update({f"eval/{k}": v for k, v in task.evaluate(eval_module).items()})
                if live is not None:
                    task.load_state_dict(module, live)
                model.train()
            pos.history.append(record)
            if session.rank == 0 and (pos.step % cfg.log_every == 0 or save or pos.step == 1):
                rate = (pos.step - start_step) / max(time.perf_counter() - started, 1e-9)
                print(_progress(cfg, record, rate), flush=True)
            if save:
                checkpoint(record)
        if pos.step < cfg.steps:
            pos.epoch += 1
            pos.in_epoch = 0
    return pos


def read_state(data: bytes) -> dict:
    """A checkpoint's state.pt, loaded without unpickling arbitrary objects."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
