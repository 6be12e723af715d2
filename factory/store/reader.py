"""Reading a cohort: ``open_cohort(url)`` gives the manifest, volumes, a PyTorch-ready dataset
and a Ray Dataset, all streaming volume by volume from the store (local or s3://).

Nothing here imports torch: :class:`CohortDataset` is a map-style dataset (``__len__`` and
``__getitem__`` returning numpy arrays) that ``torch.utils.data.DataLoader`` takes as is. It
opens the store lazily in each process, because s3fs handles do not survive a fork.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import pandas as pd

from factory import vocab
from factory.store.cohort import CohortStore
from factory.store.fs import StoreError


class Cohort(CohortStore):
    """A committed cohort, read-only: ``manifest``, ``volume(id)``, ``dataset()``..."""

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per committed volume: the 18 findings (CT-RATE columns), attributes,
        demographics, prompt, seed, checksums, sizes and timings."""
        return self.read_manifest()

    def dataset(self, ids: Sequence[str] | None = None, masks: bool = False) -> CohortDataset:
        """A map-style dataset of the committed volumes (or ``ids``), in manifest order."""
        chosen = self.manifest if ids is None else self.manifest.set_index("volume_id").loc[ids]
        ids = list(chosen.index if ids is not None else chosen["volume_id"])
        return CohortDataset(self.url, self.storage_options, ids, masks)

    def ray_dataset(self, masks: bool = False, batch_size: int = 4):
        """A Ray Dataset of the committed volumes for training on a cohort: the manifest rows,
        read into ``hu`` (and ``anatomy``) columns by Ray tasks, block by block."""
        import ray

        rows = self.manifest.drop(columns=["shape", "spacing_mm"])
        return ray.data.from_pandas(rows).map_batches(
            _ReadVolumes,
            fn_constructor_kwargs={
                "url": self.url,
                "storage_options": self.storage_options,
                "masks": masks,
            },
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        )


class CohortDataset:
    """``dataset[i]`` -> {"volume_id", "hu" (int16, x y z), "labels" (18 x uint8), "prompt"
    and, with ``masks``, "anatomy" (channel x X x Y x Z uint8)}."""

    def __init__(self, url: str, storage_options: dict, ids: list[str], masks: bool = False):
        self.url = url
        self.storage_options = storage_options
        self.ids = ids
        self.masks = masks
        self._cohort: Cohort | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cohort(self) -> Cohort:
        if self._cohort is None or self._pid != os.getpid():  # a forked DataLoader worker
            self._cohort, self._pid = Cohort(self.url, self.storage_options), os.getpid()
        return self._cohort

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cohort": None, "_pid": -1}

    def __getitem__(self, i: int) -> dict:
        volume = self.cohort.volume(self.ids[i], masks=self.masks)
        record = volume.record
        item = {
            "volume_id": volume.volume_id,
            "hu": volume.hu,
            "labels": np.array([record["labels"][c] for c in vocab.COLUMNS], np.uint8),
            "prompt": record["prompt"],
        }
        if self.masks:
            item["anatomy"] = np.stack(list(volume.masks.values())) if volume.masks else None
        return item


class _ReadVolumes:
    """Ray Data callable: adds each row's HU volume (and anatomy) read from the store."""

    def __init__(self, url: str, storage_options: dict, masks: bool):
        self.cohort = Cohort(url, storage_options)
        self.masks = masks

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        volumes = [self.cohort.volume(v, masks=self.masks) for v in batch["volume_id"]]
        batch = batch.copy()
        batch["hu"] = [v.hu for v in volumes]
        if self.masks:
            batch["anatomy"] = [np.stack(list(v.masks.values())) for v in volumes]
        return batch


def open_cohort(url: str, storage_options: dict | None = None) -> Cohort:
    """Open a cohort for reading; fails naming the URL if there is none or of another format."""
    cohort = Cohort(url, storage_options)
    if not cohort.exists():
        raise StoreError(f"{url}: no cohort here (no zarr.json at the root)")
    cohort.settings()  # refuses another format, naming it
    return cohort
