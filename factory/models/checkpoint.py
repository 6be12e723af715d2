"""Checkpoints: a model is a directory of safetensors weights, config, model card and hashes.

Layout of a checkpoint directory::

    config.yaml              the ModelConfig (factory.models.config.dump_config)
    {network}.safetensors    one per network present, network in NETWORKS (any subset)
    model_card.md            the ModelCard for people
    model_card.json          the same ModelCard for programs
    labels.csv               optional: the training labels in CT-RATE layout (reference: model)
    images/*.png             optional: pictures the model card shows
    checksums.json           {"algorithm": "sha256", "files": {name: sha256}, "content_hash": ...}

The content hash is the sha256 of the lines ``f"{name}\\t{sha256}\\n"`` (UTF-8) for every file
but checksums.json, sorted by name (relative, "/"-separated). It names the model in every
generated volume's metadata.

A reference is ``builtin:NAME`` (``factory/models/builtin/NAME``), a local directory, or an fsspec
URL (``s3://bucket/model``, ``memory://...``; ``file://`` is a local directory). Remote checkpoints
are downloaded into a cache: ``cache_dir`` if given, else ``$CTFACTORY_CACHE/models``, else
``~/.cache/ct-factory/models``, one subdirectory per content hash. Every load reads the URL's
checksums.json (a listing and one small read); a copy of that content already cached and intact
is used, otherwise the files are downloaded into a temporary directory, verified against that
checksums.json and renamed into place, so that an entry is never half-written or replaced by
other content, and a model replaced at its URL is a new entry (the old one stays until removed).
S3 credentials and endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or from ``storage_options`` (e.g.
``{"endpoint_url": ...}``), passed to fsspec as is.

Nothing is ever unpickled: weights are read with ``safetensors.torch.load_file`` only, and a
directory holding a pickle-format file, a symbolic link or anything but plain files and
directories is refused before anything in it is read. The files read whole (config, card,
checksums) are limited to MAX_METADATA_BYTES, checked before they are read. Loading checks each
weights file's safetensors header (at most MAX_HEADER_BYTES, as the safetensors library allows)
against its size, tensor by tensor; a network's tensors are read the first time they are asked
for, so that a driver that only checks a model never loads torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import reprlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import yaml

if TYPE_CHECKING:
    import torch

from factory.errors import CtFactoryError
from factory.models.card import ModelCard
from factory.models.config import ConfigError, ModelConfig, dump_config, parse_config
from factory.refs import BUILTIN_PREFIX, REF_FORMS, RefError, parse_ref

NETWORKS: tuple[str, ...] = ("vae", "clip", "diffusion", "text", "classifier")
CONFIG_FILE = "config.yaml"
CARD_MARKDOWN = "model_card.md"
CARD_JSON = "model_card.json"
LABELS_FILE = "labels.csv"  # read by factory.cohort.reference for ``reference: model``
CHECKSUMS_FILE = "checksums.json"
IMAGES_DIR = "images"
_CARRIED = {CONFIG_FILE, CARD_MARKDOWN, CARD_JSON, LABELS_FILE, CHECKSUMS_FILE}
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
BUILTIN_DIR = Path(__file__).parent / "builtin"
METADATA_FILES = (CONFIG_FILE, CARD_JSON, CHECKSUMS_FILE)  # the files read whole
MAX_METADATA_BYTES = 1 << 20  # each of METADATA_FILES (builtin:demo's largest: 10 kB)
MAX_HEADER_BYTES = 100_000_000  # a safetensors header, the safetensors library's own limit
DTYPE_BYTES = {  # the safetensors dtypes torch reads, and their sizes
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64", "C64"), 8),
}


class CheckpointError(CtFactoryError, ValueError):
    """A checkpoint that cannot be saved, found or trusted; the message names directory and file."""


class Weights(Mapping):
    """Network name -> its weights, each read from ``{network}.safetensors`` on first use."""

    def __init__(self, directory: Path, networks: list[str]):
        self.directory, self._networks = directory, networks
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}

    def __getitem__(self, network: str) -> dict[str, torch.Tensor]:
        if network not in self._networks:
            raise KeyError(network)
        if network not in self._loaded:
            from safetensors.torch import load_file

            name = f"{network}{WEIGHTS_SUFFIX}"
            try:
                self._loaded[network] = load_file(self.directory / name)
            except Exception as exc:
                raise CheckpointError(
                    f"{self.directory}: {name} is not a safetensors file: {exc}"
                ) from exc
        return self._loaded[network]

    def __contains__(self, network: object) -> bool:  # by name: Mapping's would read the file
        return network in self._networks

    def __iter__(self) -> Iterator[str]:
        return iter(self._networks)

    def __len__(self) -> int:
        return len(self._networks)


def check_safetensors(path: Path, error: type[CheckpointError] = CheckpointError) -> None:
    """Refuse a file that is not safetensors as the format defines it, by its header against its
    size, tensor by tensor, before any tensor is read or allocated (and without torch); raises
    ``error`` naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header, data_size = _read_header(f, size)
        _check_tensors(header, data_size)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not a readable safetensors file: {exc}") from None


def _read_header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """The JSON header of an open safetensors file of ``size`` bytes and the size of its data
    section; the length it claims is bounded before anything more is read."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{size} bytes, less than the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(
            f"its header claims {length:,} bytes; the limit is {MAX_HEADER_BYTES:,} bytes"
        )
    if 8 + length > size:
        raise ValueError(
            f"its header claims {length:,} bytes but only {size - 8:,} follow its length"
        )
    try:
        header = json.loads(f.read(length).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"its header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, size - 8 - length


def _check_tensors(header: dict, data_size: int) -> None:
    """Every tensor of a header within a data section of ``data_size`` bytes: each where it
    claims, the tensors back to back in offset order, the last ending where the file does."""
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("its __metadata__ is not a mapping of strings")
    end = 0
    for (begin, stop), name in sorted((_span(k, v, data_size), k) for k, v in header.items()):
        if begin != end:
            raise ValueError(
                f"tensor {name!r} starts at byte {begin:,} of the data, not at {end:,} where "
                "the tensor before it ends (tensors must be back to back)"
            )
        end = stop
    if end != data_size:
        raise ValueError(
            f"its tensors end at byte {end:,} of the data but the file at {data_size:,}"
        )


def _span(name: str, info: object, data_size: int) -> tuple[int, int]:
    """A tensor's data offsets, checked: a dtype torch reads, a shape of naturals, offsets within
    the data section spanning exactly the bytes that dtype and shape need."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: not a mapping of dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in DTYPE_BYTES):
        raise ValueError(
            f"tensor {name!r}: dtype {reprlib.repr(dtype)}; valid: {', '.join(DTYPE_BYTES)}"
        )
    if not _naturals(shape):
        raise ValueError(f"tensor {name!r}: shape {reprlib.repr(shape)} is not a list of naturals")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise ValueError(
            f"tensor {name!r}: data_offsets {reprlib.repr(offsets)} are not [begin, end] with "
            "begin <= end"
        )
    begin, end = offsets
    if end > data_size:
        raise ValueError(
            f"tensor {name!r}: data_offsets [{begin:,}, {end:,}] reach past the data section's "
            f"{data_size:,} bytes"
        )
    need = _nbytes(shape, DTYPE_BYTES[dtype])
    if need != end - begin:
        what = "more than 2^64" if need is None else f"{need:,}"
        raise ValueError(
            f"tensor {name!r}: {dtype} of shape {reprlib.repr(shape)} needs {what} bytes but "
            f"its data_offsets span {end - begin:,}"
        )
    return begin, end


def _naturals(value: object) -> bool:
    """Whether ``value`` is a JSON list of non-negative integers (not booleans)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """The bytes a tensor of ``shape`` needs, or None beyond 2^64: a shape claiming enormous
    tensors is never multiplied out."""
    if 0 in shape:
        return 0
    need = itemsize
    for dim in shape:
        need *= dim
        if need > 1 << 64:
            return None
    return need


@dataclass
class Checkpoint:
    """A loaded, verified model: its directory, config, weights per network, card and hash."""

    directory: Path
    config: ModelConfig
    weights: Mapping[str, dict[str, torch.Tensor]]
    card: ModelCard
    hash: str

    def state_dict(self, network: str) -> dict[str, torch.Tensor]:
        """The weights of one network, or an error listing the networks this checkpoint has."""
        if network not in self.weights:
            raise CheckpointError(
                f"{self.directory}: no {network!r} network in this checkpoint "
                f"(no {network}{WEIGHTS_SUFFIX}); available: {', '.join(self.weights)}"
            )
        return self.weights[network]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_of(files: Mapping[str, str]) -> str:
    """The content hash from (relative name, file sha256) pairs."""
    h = hashlib.sha256()
    for name, digest in sorted(files.items()):
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


def _listing(directory: Path) -> list[str]:
    """Every file below ``directory`` as a relative "/"-separated name, sorted. A symbolic link
    (to a file or a directory, inside or out) or anything else that is not a plain file or
    directory is refused, by its name alone: what is verified must be what is read."""
    names = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            where = "inside" if target.is_relative_to(os.path.realpath(directory)) else "outside"
            raise CheckpointError(
                f"{directory}: {name} is a symbolic link to {os.readlink(path)} ({target}, "
                f"{where} the checkpoint); a checkpoint holds plain files and directories only: "
                "copy the file in its place"
            )
        if path.is_file():
            names.append(name)
        elif not path.is_dir():
            raise CheckpointError(
                f"{directory}: {name} is not a plain file or directory; a checkpoint holds "
                "plain files and directories only"
            )
    return names


def _check_size(where: str, size: int) -> None:
    """Refuse a metadata file (config, card or checksums) over MAX_METADATA_BYTES, by the size
    its file system states, before it is read."""
    if size > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{where}: {size:,} bytes; the limit for {', '.join(METADATA_FILES)} is "
            f"{MAX_METADATA_BYTES:,} bytes (ct-factory writes a few kB)"
        )


def _read_metadata(path: Path) -> bytes:
    """A local metadata file's bytes, its size checked first."""
    _check_size(str(path), path.stat().st_size)
    return path.read_bytes()


def _refuse_pickles(where: str, names: list[str]) -> None:
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{where}: refusing to load a checkpoint holding pickle-format files "
            f"({', '.join(pickles)}): unpickling can run arbitrary code, so ct-factory never "
            f"unpickles. Convert the weights to safetensors ({{network}}{WEIGHTS_SUFFIX} with "
            "safetensors.torch.save_file, in a trusted environment) and remove those files."
        )


def content_hash(directory: str | Path) -> str:
    """The content hash of the files now in ``directory`` (all but checksums.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    names = [n for n in _listing(directory) if n != CHECKSUMS_FILE]
    return _hash_of({n: _sha256_file(directory / n) for n in names})


def _no_checksums(where: str) -> CheckpointError:
    """The error for a directory or URL without checksums.json."""
    return CheckpointError(
        f"{where}: no {CHECKSUMS_FILE}, so this is not a ct-factory checkpoint "
        "(save one with factory.models.checkpoint.save_checkpoint)"
    )


def _read_checksums(directory: Path) -> tuple[dict[str, str], str]:
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        raise _no_checksums(str(directory))
    return _parse_checksums(str(path), _read_metadata(path))


def _parse_checksums(where: str, text: bytes) -> tuple[dict[str, str], str]:
    """The file hashes and content hash of a checksums.json, which must agree."""
    try:
        data = json.loads(text)
        files, recorded = data["files"], data["content_hash"]
        if not (isinstance(files, dict) and isinstance(recorded, str)):
            raise TypeError("files must be a mapping and content_hash a string")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("files must map names to sha256 strings")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
    if _hash_of(files) != recorded:
        raise CheckpointError(
            f"{where}: the content hash does not match the file hashes it lists; "
            "checksums.json was edited or corrupted"
        )
    return files, recorded


def _check_files(directory: Path, hash_files: bool, where: str = "") -> str:
    """Check a checkpoint directory against its checksums.json; returns its content hash.

    Refuses links and pickles first, then checks the required files, the file set, and
    (``hash_files``) every file's sha256. Errors name ``where`` (the URL of a download) or the
    directory.
    """
    where = where or str(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{where}: no such checkpoint directory")
    present = _listing(directory)
    _refuse_pickles(where, present)
    for required in (CONFIG_FILE, CARD_JSON):
        if required not in present:
            raise CheckpointError(f"{where}: missing {required}")
    for name in METADATA_FILES:
        if name in present:  # before any is read or hashed
            _check_size(f"{where}/{name}", (directory / name).stat().st_size)
    files, recorded = _read_checksums(directory)
    present = [n for n in present if n != CHECKSUMS_FILE]
    _check_file_set(where, present, files)
    if hash_files:
        for name in present:
            actual = _sha256_file(directory / name)
            if actual != files[name]:
                raise CheckpointError(
                    f"{where}: {name} does not match {CHECKSUMS_FILE} (sha256 "
                    f"{actual[:12]}..., recorded {files[name][:12]}...): the content hash does not "
                    "match, the file was changed or corrupted after saving"
                )
    return recorded


def _check_file_set(where: str, present: list[str], files: Mapping[str, str]) -> None:
    """Refuse files missing from ``present`` (all but checksums.json) or not listed in it."""
    missing = sorted(set(files) - set(present))
    if missing:
        raise CheckpointError(
            f"{where}: missing {', '.join(missing)} (listed in {CHECKSUMS_FILE}); "
            "the checkpoint is incomplete"
        )
    extra = sorted(set(present) - set(files))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected file(s) {', '.join(extra)} not listed in {CHECKSUMS_FILE}; "
            "the content hash does not cover them: remove them or save the checkpoint again"
        )


def _is_checkpoint(directory: Path) -> bool:
    return (directory / CHECKSUMS_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def _prepare_weights(
    directory: Path, network: str, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors sharing storage are copied (safetensors refuses them)."""
    import torch

    if not state:
        raise CheckpointError(f"{directory}: weights[{network!r}] is empty")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{directory}: weights[{network!r}][{key!r}] is a {type(tensor).__name__}, "
                "not a tensor"
            )
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[str(key)] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def _swap_into_place(tmp: Path, destination: Path) -> None:
    """Rename ``tmp`` to ``destination``, replacing an old checkpoint there only once complete."""
    if not destination.exists():
        tmp.rename(destination)
        return
    old = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
    destination.rename(old)
    try:
        tmp.rename(destination)
    except BaseException:
        old.rename(destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    card: ModelCard,
    labels_csv: str | Path | None = None,
    images: Mapping[str, bytes] | None = None,
) -> str:
    """Write a checkpoint directory atomically and return its content hash.

    ``images`` maps PNG file names to their bytes, stored under ``images/`` for the card.

    Everything is written into a temporary sibling directory first and renamed into place, so
    ``directory`` holds either the old content or the complete new checkpoint. An existing
    checkpoint (or empty directory) may be replaced; any other existing path is refused.
    """
    from safetensors.torch import save_file

    directory = Path(directory).absolute()
    unknown = sorted(set(weights) - set(NETWORKS))
    if unknown:
        raise CheckpointError(
            f"{directory}: unknown network(s) {', '.join(unknown)}; valid: {', '.join(NETWORKS)}"
        )
    if not weights:
        raise CheckpointError(
            f"{directory}: no networks to save; give at least one of {', '.join(NETWORKS)}"
        )
    check_destination(directory)
    bad = [n for n in images or {} if not re.fullmatch(r"[A-Za-z0-9_.-]+\.png", n)]
    if bad:
        raise CheckpointError(f"{directory}: image names must be plain NAME.png files: {bad}")
    if labels_csv is not None and not Path(labels_csv).is_file():
        raise CheckpointError(f"{directory}: labels_csv {labels_csv} is not a file")
    try:
        card_json = json.dumps(dataclasses.asdict(card), indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: model card is not JSON-serialisable: {exc}") from None
    _check_size(f"{directory}/{CARD_JSON}", len(card_json.encode()))  # what a load would refuse

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")
        for network in sorted(weights):
            save_file(
                _prepare_weights(directory, network, weights[network]),
                tmp / f"{network}{WEIGHTS_SUFFIX}",
            )
        (tmp / CARD_MARKDOWN).write_text(card.to_markdown(), encoding="utf-8")
        (tmp / CARD_JSON).write_text(card_json, encoding="utf-8")
        if labels_csv is not None:
            shutil.copyfile(labels_csv, tmp / LABELS_FILE)
        for name, data in (images or {}).items():
            (tmp / IMAGES_DIR).mkdir(exist_ok=True)
            (tmp / IMAGES_DIR / name).write_bytes(data)
        files = {name: _sha256_file(tmp / name) for name in _listing(tmp)}
        digest = _hash_of(files)
        checksums = {"algorithm": "sha256", "files": files, "content_hash": digest}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return digest


def check_destination(directory: str | Path) -> None:
    """Refuse to write a checkpoint over anything but nothing, an empty directory or a
    checkpoint; callers with slow work to do before saving check first."""
    directory = Path(directory)
    if directory.exists() and not (
        directory.is_dir() and (_is_checkpoint(directory) or not any(directory.iterdir()))
    ):
        raise CheckpointError(
            f"{directory}: exists and is not a ct-factory checkpoint (no {CHECKSUMS_FILE} and "
            f"{CONFIG_FILE}); refusing to overwrite it: choose a new directory or remove it"
        )


def check_carried(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint holding files that :func:`save_with_card` would silently drop."""
    directory = checkpoint.directory
    dropped = [
        p.relative_to(directory).as_posix()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and p.name not in _CARRIED
        and not p.name.endswith(WEIGHTS_SUFFIX)
        and p.parent.name != IMAGES_DIR
    ]
    if dropped:
        raise CheckpointError(
            f"{directory}: holds files a new card cannot carry over ({', '.join(dropped)}); "
            "only config, weights, model card, labels.csv and images are rewritten"
        )


def save_with_card(
    checkpoint: Checkpoint, directory: str | Path, card: ModelCard, images: Mapping[str, bytes]
) -> str:
    """Write ``checkpoint`` (config, weights and labels unchanged) with a new card and its
    pictures to ``directory``; returns the new content hash."""
    check_carried(checkpoint)
    labels = checkpoint.directory / LABELS_FILE
    return save_checkpoint(
        directory,
        checkpoint.config,
        checkpoint.weights,
        card,
        labels_csv=labels if labels.is_file() else None,
        images=images,
    )


def _builtin(name: str) -> Path:
    available = (
        sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir() and p.name[0] not in "._")
        if BUILTIN_DIR.is_dir()
        else []
    )
    if name not in available:
        raise CheckpointError(
            f"{BUILTIN_PREFIX}{name}: no such builtin model; available: "
            f"{', '.join(BUILTIN_PREFIX + a for a in available) or 'none yet'}"
        )
    return BUILTIN_DIR / name


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("CTFACTORY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ct-factory") / "models"


def _open(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """The fsspec file system of a checkpoint URL and the checkpoint's root path on it."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except Exception as exc:
        raise CheckpointError(f"{url}: cannot open: {exc}") from exc
    return fs, root.rstrip("/")


def _remote_files(fs: Any, root: str, url: str) -> dict[str, int]:
    """Every file of a remote checkpoint by relative name, with its listed size. Refuses, before
    anything is read: no files, no checksums.json, pickles, names that would be written outside
    the checkpoint, and metadata files over MAX_METADATA_BYTES."""
    prefix = root + "/"
    try:
        listed = fs.find(root, detail=True)
    except Exception as exc:
        raise CheckpointError(f"{url}: cannot list the checkpoint: {exc}") from exc
    files = {  # a name ending in "/" is an object store's directory marker, not a file
        p[len(prefix) :]: int(i.get("size") or 0)
        for p, i in listed.items()
        if p.startswith(prefix) and not p.endswith("/")
    }
    if not files:
        raise CheckpointError(f"{url}: no checkpoint there (no files found)")
    _refuse_pickles(url, list(files))
    odd = sorted(n for n in files if {"", ".", ".."} & set(n.split("/")))
    if odd:
        raise CheckpointError(
            f"{url}: refusing file names that are not plain relative paths ({', '.join(odd)}): "
            "they could be written outside the checkpoint's copy"
        )
    for name in METADATA_FILES:
        _check_size(f"{url}/{name}", files.get(name, 0))
    if CHECKSUMS_FILE not in files:
        raise _no_checksums(url)
    return files


def _cat(fs: Any, root: str, url: str, name: str) -> bytes:
    """A remote metadata file's bytes (its listed size checked before), at most
    MAX_METADATA_BYTES of them whatever it has become since."""
    try:
        return fs.cat_file(f"{root}/{name}", start=0, end=MAX_METADATA_BYTES)
    except Exception as exc:
        raise CheckpointError(f"{url}: cannot read {name}: {exc}") from exc


def _download(fs: Any, root: str, url: str, names: list[str], target: Path) -> None:
    """Copy the files ``names`` of the checkpoint at ``root`` on ``fs`` into ``target``."""
    try:
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{name}", str(target / name))
    except Exception as exc:
        raise CheckpointError(f"{url}: download failed: {exc}") from exc


def upload_checkpoint(directory: Path, url: str, storage_options: dict | None = None) -> None:
    """Copy a saved checkpoint directory to a URL (object storage has no rename): the old
    checkpoint's checksums go first and the new ones last, so that a reader sees either no
    checkpoint or a complete one (a download verifies every file against them)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    old = fs.find(root)  # [] where nothing is
    if old and f"{root}/{CHECKSUMS_FILE}" not in old:
        raise CheckpointError(
            f"{url}: exists and is not a ct-factory checkpoint (no {CHECKSUMS_FILE}); refusing "
            "to overwrite it: choose a new URL or remove it"
        )
    names = _listing(directory)
    if old:
        fs.rm(f"{root}/{CHECKSUMS_FILE}")
        keep = {f"{root}/{n}" for n in names} | {f"{root}/{CHECKSUMS_FILE}"}
        stale = [p for p in old if p not in keep]
        if stale:
            fs.rm(stale)
    for name in [n for n in names if n != CHECKSUMS_FILE] + [CHECKSUMS_FILE]:
        fs.pipe_file(f"{root}/{name}", (directory / name).read_bytes())


def _cached(
    url: str, cache_dir: Path | None, storage_options: dict | None, hash_files: bool
) -> tuple[Path, str]:
    """The local copy of a remote checkpoint and its content hash. The URL's checksums.json
    names the content: a cached copy of it that verifies is used, otherwise every other file
    is downloaded into a temporary directory, verified against that checksums.json, and
    renamed into place as the entry of that content hash."""
    url = url.rstrip("/")
    fs, root = _open(url, storage_options)
    names = [n for n in _remote_files(fs, root, url) if n != CHECKSUMS_FILE]
    checksums = _cat(fs, root, url, CHECKSUMS_FILE)
    files, digest = _parse_checksums(f"{url}/{CHECKSUMS_FILE}", checksums)
    _check_file_set(url, names, files)
    entry = _cache_root(cache_dir) / digest
    if _intact(entry, digest, hash_files):
        return entry, digest
    damaged = entry.exists()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / CHECKSUMS_FILE).write_bytes(checksums)
        _download(fs, root, url, names, tmp)
        try:
            _check_files(tmp, hash_files=True, where=url)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}; nothing was cached: the model at the URL changed after its "
                f"{CHECKSUMS_FILE} was written, or while it was downloaded"
            ) from None
        _settle(tmp, entry, replace=damaged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, digest


def _intact(entry: Path, digest: str, hash_files: bool) -> bool:
    """Whether a cache entry holds the checkpoint of content hash ``digest``, checked as a local
    directory is (``hash_files``: every file's sha256)."""
    try:
        return entry.is_dir() and _check_files(entry, hash_files) == digest
    except CheckpointError:
        return False  # a damaged copy: downloaded afresh


def _settle(tmp: Path, entry: Path, replace: bool) -> None:
    """Rename a verified download to its cache entry: ``replace`` a damaged entry, else keep an
    entry that another process completed meanwhile (the same content, which it may be reading)."""
    if replace:
        _swap_into_place(tmp, entry)
        return
    try:
        tmp.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise


def _locate(
    ref: str | Path, cache_dir: Path | None, storage_options: dict | None, hash_files: bool
) -> tuple[Path, str | None]:
    """The local directory for ``ref``, with its content hash when already verified."""
    try:
        parsed = parse_ref(str(ref))
    except RefError as exc:
        raise CheckpointError(str(exc)) from None
    if parsed.kind == "builtin":
        return _builtin(parsed.name), None
    if parsed.kind == "remote":
        return _cached(parsed.url, cache_dir, storage_options, hash_files)
    return Path(parsed.path), None


def resolve(
    ref: str | Path, cache_dir: Path | None = None, storage_options: dict | None = None
) -> Path:
    """The local directory of a checkpoint reference, downloading a remote one if needed."""
    path, _ = _locate(ref, cache_dir, storage_options, hash_files=True)
    if not path.is_dir():
        raise CheckpointError(f"{ref}: no such checkpoint directory; expected {REF_FORMS}")
    return path


def _read_card(directory: Path) -> ModelCard:
    path = directory / CARD_JSON
    return _parse_card(str(path), _read_metadata(path))


def _parse_card(where: str, text: bytes) -> ModelCard:
    """A model card from its JSON, or an error naming ``where``."""
    try:
        return ModelCard(**json.loads(text))
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not a valid model card: {exc}") from None


def _read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    try:
        return parse_config(yaml.safe_load(_read_metadata(path).decode("utf-8")), str(path))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def describe(ref: str | Path, storage_options: dict | None = None) -> tuple[ModelCard, str]:
    """A checkpoint's model card and recorded content hash, without reading its weights.

    A remote checkpoint is not downloaded: it is listed and its two small JSON files are read.
    """
    parsed = parse_ref(str(ref))
    if parsed.kind == "remote":
        url = parsed.url
        fs, root = _open(url, storage_options)
        _remote_files(fs, root, url)
        _, digest = _parse_checksums(f"{url}/{CHECKSUMS_FILE}", _cat(fs, root, url, CHECKSUMS_FILE))
        return _parse_card(f"{url}/{CARD_JSON}", _cat(fs, root, url, CARD_JSON)), digest
    directory, _ = _locate(ref, None, storage_options, hash_files=False)
    digest = _check_files(directory, hash_files=False)
    return _read_card(directory), digest


def load_checkpoint(
    ref: str | Path,
    cache_dir: Path | None = None,
    hash_files: bool = True,
    storage_options: dict | None = None,
) -> Checkpoint:
    """Load a checkpoint by reference (see the module docstring), never unpickling anything.

    ``hash_files`` checks every file's sha256 against checksums.json; without it only the file set
    is checked and the recorded hash is trusted. ``storage_options`` go to fsspec for URLs.
    """
    directory, digest = _locate(ref, cache_dir, storage_options, hash_files)
    digest = digest or _check_files(directory, hash_files)
    config = _read_config(directory)
    card = _read_card(directory)
    networks = []
    for name in _listing(directory):
        if not name.endswith(WEIGHTS_SUFFIX):
            continue
        network = name[: -len(WEIGHTS_SUFFIX)]
        if network not in NETWORKS:
            raise CheckpointError(
                f"{directory}: {name} is not a known network; valid: "
                f"{', '.join(n + WEIGHTS_SUFFIX for n in NETWORKS)}"
            )
        check_safetensors(directory / name)
        networks.append(network)
    if not networks:
        raise CheckpointError(
            f"{directory}: no network weights; expected one or more of "
            f"{', '.join(n + WEIGHTS_SUFFIX for n in NETWORKS)}"
        )
    weights = Weights(directory, networks)
    return Checkpoint(directory, config, weights, card, digest)
