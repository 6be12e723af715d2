"""The cohort spec: a YAML language for what a synthetic cohort must contain.

:func:`load_spec` turns a YAML file into a validated, resolved :class:`CohortSpec` in three
steps, one module each: read the YAML with the line of every key (``spec_source``), check its
shape against the schema (``spec_schema``: strict pydantic models), then check its meaning and
resolve names to vocabulary ids, counts and distributions for the planner (``resolve``). Every
problem is a :class:`SpecError` naming the file and line, the key path and what would be
valid, raised before anything is planned or generated. docs/cohort-spec.md is the user's
reference.
"""

from __future__ import annotations

from pathlib import Path

from factory import yamldoc
from factory.cohort.errors import SpecError
from factory.cohort.resolve import resolve
from factory.cohort.spec_schema import CohortSpec
from factory.cohort.spec_source import read_yaml, validated


def parse_spec(text: str, name: str = "<spec>", folder: str = ".") -> CohortSpec:
    """Parse, validate and resolve spec text; ``name`` and ``folder`` locate messages and
    inputs."""
    data, source = read_yaml(text, name, folder)
    try:
        spec = validated(CohortSpec, data)
        spec._source = source
        spec._resolved = resolve(spec)
    except SpecError as error:
        error.where = error.where or source.where(error.path)
        raise
    return spec


def load_spec(path: str | Path) -> CohortSpec:
    """Read and validate a cohort spec file; raises SpecError (file:line:column: key: message)."""
    file = Path(path)
    try:
        text = yamldoc.read_text(file)
    except FileNotFoundError:
        raise SpecError((), "no such file; expected a YAML cohort spec", str(path)) from None
    except yamldoc.YamlError as exc:
        raise SpecError((), exc.message, str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError((), f"cannot read it: {exc}", str(path)) from None
    return parse_spec(text, str(path), str(file.parent))
