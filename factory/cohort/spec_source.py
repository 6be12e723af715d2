"""Where a cohort spec came from: its YAML read with the line of every key path, and pydantic's
errors turned into :class:`SpecError` naming the file, line, key and what is valid."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from factory.cohort.errors import Path, SpecError


@dataclass(frozen=True)
class Source:
    """Where a spec came from: its file name, folder and the line of every key path."""

    name: str
    folder: str
    lines: Mapping[tuple[str, ...], int]

    def where(self, path: Path) -> str:
        """``file:line`` of the deepest part of ``path`` that the file spells out."""
        parts = tuple(str(p) for p in path)
        for k in range(len(parts), -1, -1):
            line = self.lines.get(parts[:k])
            if line is not None:
                return f"{self.name}:{line}"
        return self.name


def read_yaml(text: str, name: str, folder: str) -> tuple[dict, Source]:
    """The spec's data and its :class:`Source`; a YAML problem or a top level that is not a
    mapping is a SpecError at its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise SpecError((), f"not valid YAML: {problem}", f"{name}:{line}") from None
    if node is None or not isinstance(data, dict):
        raise SpecError(
            (),
            "the spec must be a YAML mapping with schema_version, cohort, model, output, ...",
            f"{name}:1",
        )
    lines: dict[tuple[str, ...], int] = {}
    _line_map(node, (), lines, name)
    return data, Source(name, folder, lines)


def validated(model: type[BaseModel], data: Any, prefix: Path = ()) -> Any:
    """``data`` validated as ``model``; the first problem is a SpecError at ``prefix`` + key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, prefix, model) from None


def _line_map(node: yaml.Node, path: tuple[str, ...], lines: dict, name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            if key in lines and key_node.value != "<<":
                raise SpecError(
                    key,
                    f"duplicate key (first at line {lines[key]})",
                    f"{name}:{key_node.start_mark.line + 1}",
                )
            lines[key] = key_node.start_mark.line + 1
            _line_map(value_node, key, lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            _line_map(item, (*path, str(i)), lines, name)


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
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
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
