"""Training data: CT-RATE records as small rows, preprocessed where they are consumed.

A row holds paths and text, never voxels, so the driver and Ray's object store only carry
the index; ``load_row`` (run by Ray Data tasks, or in-process by the local session) reads and
preprocesses one volume with the MONAI chain of ``factory.data.transforms``. ``choose_texts``
picks each sample's text (optionally a short excerpt of its report) from a seeded generator,
so a resumed run sees the same texts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from factory.cohort.prompts import SEX_WORDS
from factory.data.ctrate import DatasetError, Record, read_split
from factory.data.transforms import preprocessing, sample
from factory.models.config import load_config

TEXT_COLUMNS = ("name", "report", "impression", "age", "sex")


def record_row(record: Record, masks: bool) -> dict:
    """The index row of a record: where its volume (and mask) is, its text and labels."""
    if masks and record.mask is None:
        raise DatasetError(
            f"{record.image}: no anatomy mask (masks/<split>/{record.name}); this model has "
            "anatomy channels, so every training volume needs one"
        )
    return {
        "name": record.name,
        "image": str(record.image),
        "mask": str(record.mask) if masks else "",
        "legend": json.dumps(record.legend) if masks else "",  # a Ray Data column: text
        "slope": float(record.rescale[0]),
        "intercept": float(record.rescale[1]),
        "report": record.report,
        "impression": record.impression or record.report,
        "age": int(record.age) if record.age is not None else -1,
        "sex": record.sex or "",
        "labels": np.asarray(record.labels, dtype=np.uint8),
    }


def index_rows(
    root: str, splits: Sequence[str] | str, masks: bool, limit: int | None = None
) -> list[dict]:
    """Rows of one or more dataset splits, in order, each split cut to its first ``limit``
    volumes (CT-RATE layout; errors name the missing file or column)."""
    records = []
    for split in [splits] if isinstance(splits, str) else splits:
        found = read_split(root, split)
        if not found:
            raise DatasetError(f"{root}: split {split!r} has no volumes")
        records += found[:limit]
    return [record_row(r, masks) for r in records]


@lru_cache(maxsize=8)
def _pipeline(model: str, masks: bool):
    return preprocessing(load_config(model), with_masks=masks)


def load_row(row: dict, model: str) -> dict:
    """Read and preprocess one row's volume: ``image`` (1, X, Y, Z) float32 in [-1, 1] and,
    with a mask, ``anatomy`` (C, X, Y, Z) uint8; text and labels pass through."""
    masks = bool(row["mask"])
    item = sample(
        Record(
            name=str(row["name"]),
            image=row["image"],
            labels=(),
            findings="",
            impression="",
            mask=row["mask"] or None,
            legend={int(k): v for k, v in json.loads(row["legend"]).items()} if masks else None,
            rescale=(float(row["slope"]), float(row["intercept"])),
        )
    )
    data = _pipeline(model, masks)(item)
    out = {k: row[k] for k in (*TEXT_COLUMNS, "labels")}
    out["image"] = np.asarray(data["image"], dtype=np.float32)
    if masks:
        out["anatomy"] = np.asarray(data["mask"], dtype=np.uint8)
    return out


def structured(impression: str, age: int, sex: str) -> str:
    """A GenerateCT-style prompt: "{age} years old {sex}: {impression}"."""
    if age < 0 or sex not in SEX_WORDS:
        return impression
    return f"{age} years old {SEX_WORDS[sex]}: {impression}"


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
EXCERPT_SENTENCES = 3  # an excerpt keeps 1 to this many sentences of its report


def excerpt(report: str, gen: torch.Generator) -> str:
    """1 to ``EXCERPT_SENTENCES`` of the report's sentences, in report order.

    A whole report's pooled embedding is a blur of fifteen sentences, and a short prompt such
    as "no pleural effusion" embeds close to "pleural effusion on the right"; trained on
    excerpts, the model learns what one sentence says (under ``text.negations: guide`` a
    pertinent negative is then cut away, leaving the unconditional-like empty text).
    """
    sentences = [s for s in SENTENCE_END.split(report.strip()) if s]
    if len(sentences) <= 1:
        return report
    k = int(torch.randint(1, min(EXCERPT_SENTENCES, len(sentences)) + 1, (1,), generator=gen))
    keep = sorted(torch.randperm(len(sentences), generator=gen)[:k].tolist())
    return " ".join(sentences[i] for i in keep)


def choose_texts(batch: dict, mode: str, gen: torch.Generator, excerpts: float = 0.0) -> list[str]:
    """Each sample's text for this step: report, impression, or a seeded mix of both and the
    structured prompt (so the model learns the prompts the factory writes); with probability
    ``excerpts`` a sample gets an excerpt of its report instead."""
    reports = [str(t) for t in batch["report"]]
    if mode == "report":
        texts = reports
    elif mode == "impression":
        texts = [str(t) for t in batch["impression"]]
    else:
        impressions = [str(t) for t in batch["impression"]]
        picks = torch.randint(0, 3, (len(reports),), generator=gen).tolist()
        texts = []
        for i, pick in enumerate(picks):
            options = (
                reports[i],
                impressions[i],
                structured(impressions[i], int(batch["age"][i]), str(batch["sex"][i])),
            )
            texts.append(options[pick])
    if excerpts <= 0:
        return texts
    swap = (torch.rand(len(texts), generator=gen) < excerpts).tolist()
    return [excerpt(reports[i], gen) if swap[i] else text for i, text in enumerate(texts)]
