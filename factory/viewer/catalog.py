"""A cohort's manifest as the cohort browser lists it: filters from a query string, rows as
JSON. Plain functions of a DataFrame, so that they are tested without a server."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from factory import vocab
from factory.errors import CtFactoryError

NO_FINDING = "none"  # finding=none: volumes with none of the 18 findings
SEXES = ("M", "F")
VERIFIED = {"true": True, "false": False}
PARAMETERS = ("finding", "attribute", "sex", "age_min", "age_max", "prompt", "verified", "limit")
LIMIT, MAX_LIMIT = 500, 10_000  # rows a listing returns, by default and at most
JSON_COLUMNS = ("attributes", "sampler", "verify_failed", "verify_scores")
SUMMARY = (  # what the list shows of a volume
    "volume_id", "index", "findings", "attributes", "age", "sex", "prompt", "seed", "verified",
    "verify_failed",
)  # fmt: skip


class QueryError(CtFactoryError, ValueError):
    """A filter that cannot be applied; ``parameter`` names it, the message what is valid."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True)
class Query:
    """What the list shows: volumes with all ``findings`` (CT-RATE columns; ``no_finding``: with
    none), some finding having each ``attributes`` (name, value) pair, the sex, the age range,
    the prompt containing ``prompt`` (case ignored) and the verification result."""

    findings: tuple[str, ...] = ()
    no_finding: bool = False
    attributes: tuple[tuple[str, str], ...] = ()
    sex: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    prompt: str = ""
    verified: bool | None = None
    limit: int = LIMIT  # of the rows kept, how many a listing returns


def _one(name: str, values: Sequence[str]) -> str | None:
    given = [v for v in values if v != ""]
    if len(given) > 1:
        raise QueryError(name, f"given {len(given)} times; give it once")
    return given[0] if given else None


def _whole(name: str, values: Sequence[str], lo: int, hi: int) -> int | None:
    text = _one(name, values)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        raise QueryError(name, f"{text!r} is not a whole number") from None
    if not lo <= number <= hi:
        raise QueryError(name, f"{number} is outside {lo} to {hi}")
    return number


def parse_query(params: Sequence[tuple[str, str]]) -> Query:
    """A :class:`Query` from query-string pairs (repeatable ``finding`` and ``attribute``)."""
    given: dict[str, list[str]] = {}
    for key, value in params:
        if key not in PARAMETERS:
            raise QueryError(key, f"unknown filter; valid: {', '.join(PARAMETERS)}")
        given.setdefault(key, []).append(value.strip())
    findings, no_finding = [], False
    for name in (v for v in given.get("finding", []) if v):
        if name.lower() == NO_FINDING:
            no_finding = True
            continue
        try:
            findings.append(vocab.finding(name).column)
        except vocab.VocabError as exc:
            raise QueryError("finding", f"{exc} or {NO_FINDING!r}") from None
    if no_finding and findings:
        raise QueryError("finding", f"{NO_FINDING!r} excludes {', '.join(findings)}")
    attributes = []
    for text in (v for v in given.get("attribute", []) if v):
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise QueryError("attribute", f"{text!r}: expected NAME=VALUE, e.g. laterality=left")
        attributes.append((name.strip(), value.strip()))
    sex = _one("sex", given.get("sex", []))
    if sex is not None and sex.upper() not in SEXES:
        raise QueryError("sex", f"{sex!r}; valid: {', '.join(SEXES)}")
    verified = _one("verified", given.get("verified", []))
    if verified is not None and verified.lower() not in VERIFIED:
        raise QueryError("verified", f"{verified!r}; valid: {', '.join(VERIFIED)}")
    query = Query(
        findings=tuple(dict.fromkeys(findings)),
        no_finding=no_finding,
        attributes=tuple(attributes),
        sex=sex.upper() if sex else None,
        age_min=_whole("age_min", given.get("age_min", []), 0, 150),
        age_max=_whole("age_max", given.get("age_max", []), 0, 150),
        prompt=_one("prompt", given.get("prompt", [])) or "",
        verified=None if verified is None else VERIFIED[verified.lower()],
        limit=_whole("limit", given.get("limit", []), 1, MAX_LIMIT) or LIMIT,
    )
    if query.age_min is not None and query.age_max is not None and query.age_min > query.age_max:
        raise QueryError("age_min", f"{query.age_min} is above age_max {query.age_max}")
    return query


def _has_attribute(text: str | None, name: str, value: str) -> bool:
    attributes = json.loads(text) if text else {}
    return any(str(a.get(name)).lower() == value.lower() for a in attributes.values())


def select(manifest: pd.DataFrame, query: Query) -> pd.DataFrame:
    """The manifest rows that ``query`` keeps, in manifest (plan) order."""
    keep = np.ones(len(manifest), bool)
    for column in query.findings:
        keep &= manifest[column].to_numpy() == 1
    if query.no_finding:
        keep &= manifest[list(vocab.COLUMNS)].to_numpy().sum(axis=1) == 0
    for name, value in query.attributes:
        keep &= np.array([_has_attribute(t, name, value) for t in manifest["attributes"]], bool)
    if query.sex is not None:
        keep &= (manifest["sex"] == query.sex).to_numpy()
    if query.age_min is not None:
        keep &= (manifest["age"] >= query.age_min).to_numpy()
    if query.age_max is not None:
        keep &= (manifest["age"] <= query.age_max).to_numpy()
    if query.prompt:
        keep &= manifest["prompt"].str.contains(query.prompt, case=False, regex=False).to_numpy()
    if query.verified is not None:
        keep &= (manifest["verified"] == query.verified).fillna(False).to_numpy(bool)
    return manifest[keep]


def _plain(value):
    """A manifest value as JSON: numpy scalars and arrays made plain, NaN and NA as null."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def record(row: Mapping) -> dict:
    """A manifest row as JSON: every column, the JSON columns parsed, and ``findings`` (the
    CT-RATE names present)."""
    out = {key: _plain(value) for key, value in row.items() if key not in vocab.COLUMNS}
    for key in JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    out["findings"] = [c for c in vocab.COLUMNS if int(row[c]) == 1]
    return out


def summary(row: Mapping) -> dict:
    """What the list shows of a volume: findings, attributes, age, sex, prompt, verification."""
    full = record(row)
    return {k: full.get(k) for k in SUMMARY}
