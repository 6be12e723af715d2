"""Where a cohort spec came from: its YAML read (bounded, see factory.yamldoc) with the line
and column of every key path, and pydantic's errors turned into :class:`SpecError` naming the
file, line, column, key and what is valid."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from factory import yamldoc
from factory.cohort.errors import Path, SpecError


@dataclass(frozen=True)
class Source:
    """Where a spec came from: its file name, folder, the (line, column) of every key path, and
    its text as given (stored beside the cohort it plans)."""

    name: str
    folder: str
    marks: Mapping[yamldoc.KeyPath, tuple[int, int]]
    text: str = ""

    def where(self, path: Path) -> str:
        """``file:line:column`` of the deepest part of ``path`` that the file spells out."""
        parts = tuple(p if isinstance(p, int) else str(p) for p in path)
        for k in range(len(parts), -1, -1):
            mark = self.marks.get(parts[:k])
            if mark is not None:
                return f"{self.name}:{mark[0]}:{mark[1]}"
        return self.name


def read_yaml(text: str, name: str, folder: str) -> tuple[dict, Source]:
    """The spec's data and its :class:`Source`, read by the bounded parser (size limit, no
    aliases, one parse); a YAML problem or a top level that is not a mapping is a SpecError at
    its line and column."""
    try:
        document = yamldoc.parse(text)
    except yamldoc.YamlError as exc:
        raise SpecError(exc.path, exc.message, exc.where(name)) from None
    if not isinstance(document.data, dict):
        raise SpecError(
            (),
            "the spec must be a YAML mapping with schema_version, cohort, model, output, ...",
            f"{name}:1:1",
        )
    return document.data, Source(name, folder, document.marks, text)


def validated(model: type[BaseModel], data: Any, prefix: Path = ()) -> Any:
    """``data`` validated as ``model``; the first problem is a SpecError at ``prefix`` + key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, prefix, model) from None


def _unwrap(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _keys_at(model: type[BaseModel], loc: Path) -> list[str]:
    """The keys valid at ``loc`` below ``model`` (empty if ``loc`` is not a mapping of fields)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def validation_error(exc: ValidationError, prefix: Path, model: type[BaseModel]) -> SpecError:
    """The first pydantic error as a SpecError: key path, offending value, what is valid."""
    errors = exc.errors(include_url=False)
    err = _misspelt_required(errors) or errors[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        required = close and (*loc[:-1], close[0]) in _missing(errors)
        hint = f"; did you mean {close[0]!r}{' (required)' if required else ''}?" if close else ";"
        return SpecError((*prefix, *loc), f"unknown key{hint} valid keys here: {', '.join(valid)}")
    if err["type"] == "missing":
        return SpecError((*prefix, *loc), "is required but missing")
    if loc and loc[-1] == "[key]":
        key = (*prefix, *loc[:-2], str(loc[-2]))
        return SpecError(key, f"the key {loc[-2]!r} must be text; quote it, e.g. '{loc[-2]}'")
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    message = message.replace("List should have", "expected a list with")
    message = message.replace(" after validation", "").replace("a valid dictionary", "a mapping")
    message = re.sub(r" or instance of \w+", "", message)
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SpecError((*prefix, *loc), f"{shown} is not valid; {message}")


def _missing(errors: list[dict]) -> set[tuple]:
    return {tuple(e["loc"]) for e in errors if e["type"] == "missing"}


def _misspelt_required(errors: list[dict]) -> dict | None:
    """An unknown key that is close to a required key missing beside it: reported in its place,
    since "did you mean" says more than "missing" (``cohrot`` for ``cohort``)."""
    missing = _missing(errors)
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] != "extra_forbidden" or not loc:
            continue
        beside = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
        if difflib.get_close_matches(str(loc[-1]), beside, n=1):
            return err
    return None
