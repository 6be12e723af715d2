"""Bounded YAML reading for the files people write (cohort specs): a size limit checked before
parsing, one parse (libyaml's C parser where PyYAML has it), aliases refused, and the line and
column of every key path, so that every later error can point at what the person wrote.

Why aliases are refused rather than expanded: a few lines of nested aliases expand to billions
of nodes (the "billion laughs"), and every reader after the parser (validation, line maps)
would follow each one. A spec has no need of them; a value used twice is written twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from factory.errors import CtFactoryError

MAX_BYTES = 256 << 10  # 256 KiB: the largest shipped spec is under 2 KiB
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A key path: mapping keys (as text) and list indices, e.g. ("joint", "constraints", 0).
KeyPath = tuple[str | int, ...]


class YamlError(CtFactoryError, ValueError):
    """YAML that is not read: the problem, at a 1-based line and column (None for the text as
    a whole, e.g. its size), and the key path it was found at."""

    def __init__(self, message: str, line: int | None = None, column: int = 1, path: KeyPath = ()):
        super().__init__(message)
        self.message, self.line, self.column, self.path = message, line, column, path

    def where(self, name: str) -> str:
        """``name:line:column`` (or ``name`` where the error has no position)."""
        return name if self.line is None else f"{name}:{self.line}:{self.column}"

    def __str__(self) -> str:
        return f"{self.where('<yaml>')}: {self.message}"


@dataclass(frozen=True)
class Document:
    """A parsed YAML document: its data and the (line, column) of every key path it spells
    out (1-based; for a key, where the key is written; for a list item, where it starts)."""

    data: Any
    marks: Mapping[KeyPath, tuple[int, int]]


def parse(text: str, max_bytes: int = MAX_BYTES) -> Document:
    """Parse one YAML document, bounded in size and never expanding aliases; YamlError else."""
    check_size(len(text.encode("utf-8", "surrogatepass")), max_bytes)
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        marks: dict[KeyPath, tuple[int, int]] = {}
        if node is not None:
            _walk(node, (), marks, set(), _mark(node))
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise syntax_error(exc) from None
    except RecursionError:  # the pure-Python composer, without libyaml's depth limit
        raise YamlError("not valid YAML: nested too deeply", 1) from None
    except yaml.YAMLError as exc:  # unmarked (a reader error): the text itself
        raise YamlError(f"not valid YAML: {' '.join(str(exc).split())}", 1) from None
    finally:
        loader.dispose()
    return Document(data, marks)


def check_size(size: int, max_bytes: int = MAX_BYTES, more: bool = False) -> None:
    """Refuse ``size`` bytes (at least that many, if ``more``) over ``max_bytes``."""
    if size > max_bytes:
        limit = f"{max_bytes:,} bytes ({max_bytes >> 10} KiB)"
        raise YamlError(
            f"too large: over the limit of {limit}"
            if more
            else f"too large: {size:,} bytes; the limit is {limit}"
        )


def read_text(file, max_bytes: int = MAX_BYTES) -> str:
    """A UTF-8 text file, read no further than ``max_bytes`` (+1, to tell that it is larger):
    a huge file, or a device that never ends, is refused without reading it whole."""
    with open(file, "rb") as f:
        raw = f.read(max_bytes + 1)
    check_size(len(raw), max_bytes, more=True)
    return raw.decode("utf-8")


def syntax_error(exc: yaml.MarkedYAMLError) -> YamlError:
    """A parser's error at the problem's line and column, saying where the construct that it
    could not finish (a bracket, a quote, a document) began."""
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = "not valid YAML: " + " ".join(str(exc.problem or exc.context or exc).split())
    opened = exc.context_mark
    if (
        exc.context
        and opened is not None
        and (opened.line, opened.column) != (mark.line, mark.column)
    ):
        message += f" ({exc.context}, begun at line {opened.line + 1}, column {opened.column + 1})"
    return YamlError(message, line, column)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: KeyPath, marks: dict, seen: set[int], at: tuple) -> None:
    """Record the marks below ``node``; refuse a node met twice (an alias: reported ``at`` the
    key or list that uses it) and duplicate keys."""
    if id(node) in seen:
        line, column = _mark(node)
        raise YamlError(
            f"an alias (*name) of the value at line {line}, column {column}; anchors and "
            "aliases (including << merge keys) are not allowed here: write the value out "
            "where it is used",
            *at,
            path,
        )
    seen.add(id(node))  # the composer shares a node only through an alias
    marks.setdefault(path, _mark(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            if key in marks:
                first = marks[key]
                raise YamlError(
                    f"duplicate key (first at line {first[0]}, column {first[1]})",
                    *_mark(key_node),
                    key,
                )
            marks[key] = _mark(key_node)
            _walk(value_node, key, marks, seen, marks[key])
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), marks, seen, marks[path])
