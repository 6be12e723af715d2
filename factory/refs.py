"""References contract: the one parser of model references and storage URLs.

A model reference is ``builtin:NAME`` (a model shipped in ``factory/models/builtin``), a local
directory (a path or ``file://`` URL), or any fsspec URL (``s3://bucket/model``,
``gs://...``, ``memory://...``). The cohort spec, the checkpoint loader, storage options, the
cohort reference and the training config all parse references here, so what one accepts the
others accept too. A storage URL (a cohort output, a run folder) is a path or an fsspec URL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from factory.errors import CtFactoryError

BUILTIN_PREFIX = "builtin:"
REF_FORMS = "builtin:NAME, a local directory, or an fsspec URL (s3://bucket/model)"
_BUILTIN_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")


class RefError(CtFactoryError, ValueError):
    """A reference or URL that is not of a valid form; the message says which forms are."""


@dataclass(frozen=True)
class Ref:
    """A parsed model reference: ``builtin`` (``name``), ``local`` (``path``) or ``remote``
    (``url``, with its fsspec ``protocol``)."""

    text: str
    kind: Literal["builtin", "local", "remote"]
    name: str = ""
    path: str = ""
    url: str = ""
    protocol: str = ""

    def storage_options(self, options: dict | None) -> dict | None:
        """Storage options for reading this reference: a remote one uses ``options`` (the
        output's endpoint and credentials); a builtin or local one needs none."""
        return (options or None) if self.kind == "remote" else None


def _protocols() -> set[str]:
    import fsspec

    return set(fsspec.available_protocols())


def parse_url(text: str) -> tuple[str, str] | None:
    """``(protocol, rest)`` of an fsspec URL, or None for a plain path; malformed URLs fail."""
    match = _URL.match(text)
    if not match:
        if "://" in text:
            raise RefError(f"{text!r}: not a URL; expected a path or an fsspec URL (s3://...)")
        return None
    protocol, rest = match.group(1), match.group(2)
    if protocol not in _protocols():
        raise RefError(f"{text!r}: unknown URL protocol {protocol!r}; e.g. s3://, gs://, file://")
    if not rest.strip("/"):
        raise RefError(f"{text!r}: the URL names no bucket or path")
    return protocol, rest


def parse_ref(text: str) -> Ref:
    """Parse a model reference; raises RefError naming the forms that are valid."""
    text = str(text).strip()
    if not text:
        raise RefError(f"an empty model reference; valid: {REF_FORMS}")
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if not _BUILTIN_NAME.match(name):
            raise RefError(f"{text!r}: not a builtin model name; valid: {REF_FORMS}")
        return Ref(text, "builtin", name=name)
    try:
        url = parse_url(text)
    except RefError as exc:
        raise RefError(f"{exc}; valid: {REF_FORMS}") from None
    if url is None or url[0] == "file":
        return Ref(text, "local", path=local_path(text))
    return Ref(text, "remote", url=text.rstrip("/"), protocol=url[0])


def is_local(url: str) -> bool:
    """Whether a storage URL or reference is on this machine's disk (a path or file://)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The absolute path of a local URL (``file://`` stripped, ``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def absolute(ref: str) -> str:
    """A local reference made absolute (so it means the same from any working directory);
    builtin names and URLs unchanged."""
    parsed = parse_ref(ref)
    return str(Path(parsed.path)) if parsed.kind == "local" else parsed.text


def ref_options(ref: str, storage_options: dict | None) -> dict | None:
    """Storage options for reading the reference ``ref`` (see :meth:`Ref.storage_options`)."""
    return parse_ref(ref).storage_options(storage_options)
