"""What goes wrong with a cohort spec, named by the key path a person wrote."""

from __future__ import annotations

from factory.errors import CtFactoryError

# A key path in a spec: mapping keys and list indices, e.g. ("joint", "constraints", 0, "count").
Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """A key path as a person reads it: ``joint.constraints[0].at_least``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class SpecError(CtFactoryError):
    """A spec that cannot be planned: where (file:line:column), the key path, and what is valid.

    Not a ValueError on purpose: raised inside pydantic validators, it passes through intact.
    """

    def __init__(self, path: Path, message: str, where: str = ""):
        super().__init__(message)
        self.path = tuple(path)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        key = format_path(self.path)
        text = f"{key}: {self.message}" if key else self.message
        return f"{self.where}: {text}" if self.where else text


class PlanningError(CtFactoryError, ValueError):
    """A target the reference cannot meet, found while raking or allocating; the planner turns
    it into a SpecError located in the spec's file."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path
        self.message = message
