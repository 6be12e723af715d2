"""The two worlds the training loop runs in: Ray Train workers, or one local process.

``RaySession`` streams this worker's shard (``get_dataset_shard``), wraps the model in DDP
through Ray Train, restores from ``get_checkpoint`` and reports checkpoints to Ray Train's
storage. ``LocalSession`` does the same in one process over an in-memory row source and a local
run directory, so each task's training function is testable without Ray.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from factory.store.fs import write_url
from train.config import TrainConfig
from train.loop import META_FILE, STATE_FILE, read_state

CHECKPOINT_PREFIX = "checkpoint_"


def collate(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Rows -> a batch of stacked columns, the layout of Ray Data's numpy batches."""
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def shuffle_seed(seed: int, epoch: int) -> int:
    """The per-epoch shuffle seed, so each epoch has its own order and a resume the same one."""
    return (seed * 1_000_003 + epoch) % (2**31)


def checkpoint_metas(run_url: str, storage_options: dict) -> list[tuple[dict, str]]:
    """(meta, directory) of every readable checkpoint under a run, newest (highest step) first;
    a checkpoint still being written or damaged is skipped, as Ray Train skips it."""
    fs, path = fsspec.core.url_to_fs(run_url, **storage_options)
    found = []
    for meta in fs.glob(f"{path}/{CHECKPOINT_PREFIX}*/{META_FILE}"):
        try:
            found.append((json.loads(fs.cat_file(meta)), meta.rsplit("/", 1)[0]))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda item: item[0].get("step", -1), reverse=True)


def newest_state(run_url: str, storage_options: dict) -> dict | None:
    """The newest checkpoint under a run that loads completely (a partial upload is skipped)."""
    fs, _ = fsspec.core.url_to_fs(run_url, **storage_options)
    for _, directory in checkpoint_metas(run_url, storage_options):
        try:
            return read_state(fs.cat_file(f"{directory}/{STATE_FILE}"))
        except Exception:  # truncated or still uploading: try the next older one
            continue
    return None


class LocalSession:
    """One process, rank 0 of 1; rows come from ``source`` (a list, read lazily by ``load``)."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        cfg: TrainConfig,
        source: Sequence[dict],
        load: Callable[[dict], dict],
        run_dir: str | Path,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.source = source
        self.load = load
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.reports: list[dict] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def batches(self, epoch: int, micro_batch: int, seed: int) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.source)))
        random.Random(shuffle_seed(seed, epoch)).shuffle(order)
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            yield collate([self.load(self.source[i]) for i in order[start : start + micro_batch]])

    def checkpoints(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        return sorted(p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())

    def restore(self) -> dict | None:
        found = self.checkpoints()
        return read_state((found[-1] / STATE_FILE).read_bytes()) if found else None

    def report(self, metrics: dict, files: dict[str, bytes] | None) -> None:
        self.reports.append(dict(metrics))
        if not files:
            return
        target = self.run_dir / f"{CHECKPOINT_PREFIX}{metrics['step']:08d}"
        tmp = self.run_dir / f".{target.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in self.checkpoints()[: -self.cfg.keep]:
            shutil.rmtree(old)

    def write(self, name: str, data: bytes) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / name).write_bytes(data)

    def all_mean(self, value: float) -> float:
        return value


class RaySession:
    """Inside a Ray Train worker: its rank, device, data shard and checkpoint storage."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.cfg = cfg
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shard = ray.train.get_dataset_shard("train")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def batches(self, epoch: int, micro_batch: int, seed: int) -> Iterator[dict[str, Any]]:
        yield from self.shard.iter_batches(
            batch_size=micro_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=self.cfg.data.shuffle_buffer,
            local_shuffle_seed=shuffle_seed(seed, epoch),
        )

    def restore(self) -> dict | None:
        """Ray Train's latest checkpoint, or a newer complete one in the run directory: a
        driver killed between a checkpoint's upload and its registration leaves one there."""
        import ray.train

        state = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = read_state((Path(directory) / STATE_FILE).read_bytes())
        newer = newest_state(self.cfg.run_url, self.cfg.storage_options)
        if newer is not None and (state is None or newer["meta"]["step"] > state["meta"]["step"]):
            return newer
        return state

    def report(self, metrics: dict, files: dict[str, bytes] | None) -> None:
        import ray.train

        if not files:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, data in files.items():
                (Path(directory) / name).write_bytes(data)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def write(self, name: str, data: bytes) -> None:
        write_url(f"{self.cfg.run_url}/{name}", data, self.cfg.storage_options)

    def all_mean(self, value: float) -> float:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size
