"""Third-party autoencoder weights into a ct-factory checkpoint (``ctfactory import-model``).

A MAISI autoencoder checkpoint is published as a raw state dict or as a dict holding it under
``unet_state_dict``; both are read with ``torch.load(weights_only=True)`` only (a pickle that
holds anything but tensors and plain containers is refused, never run), or from safetensors
(its header checked tensor by tensor against the file's size before anything is loaded).
The weights must fit the VAE the model config builds, key for key and shape for shape; a
mismatch is reported by name, a few of each kind with their counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from factory.models.card import ModelCard
from factory.models.checkpoint import (
    CheckpointError,
    _sha256_file,
    check_safetensors,
    save_checkpoint,
)
from factory.models.config import ModelConfig
from factory.models.vae import build_vae

WRAPPERS = ("unet_state_dict", "state_dict", "model")  # where published files nest the weights
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
SHOWN = 5  # names listed per kind of mismatch


class WeightsError(CheckpointError):
    """Weights that cannot become the model's VAE; the message names the file and the keys."""


@dataclass(frozen=True)
class Source:
    """What was read: the file, its sha256, where the weights sat and the prefix removed."""

    path: Path
    sha256: str
    form: str
    prefix: str


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Source]:
    """The state dict in ``path`` (a torch checkpoint or safetensors), unwrapped and with a
    DataParallel or compile prefix removed; WeightsError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors(path, WeightsError)
        try:
            loaded: object = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file: {exc}") from None
    else:
        loaded = _torch_load(path)
    weights, form = _unwrap(path, loaded)
    weights, prefix = _strip_prefix(weights)
    return weights, Source(path, _sha256_file(path), form, prefix)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure of the unpickler on an untrusted file
        text = str(exc).strip()
        why = next((ln for ln in text.splitlines() if "unsupported global" in ln.lower()), "")
        if why:  # a pickle naming other objects' classes or functions: refused, not run
            raise WeightsError(
                f"{path}: holds objects other than tensors, refused without running them "
                f"(torch.load weights_only): {why.strip()}"
            ) from None
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another format): "
            f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        ) from None


def _unwrap(path: Path, loaded: object) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict (a mapping of names "
            "to tensors)"
        )
    form = "state dict"
    for key in WRAPPERS:
        if isinstance(loaded.get(key), Mapping):
            loaded, form = loaded[key], f"state dict under {key!r}"
            break
    weights = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not weights:
        raise WeightsError(
            f"{path}: no tensors found (keys: {_few(others)}); expected a state dict, or one "
            f"under {' or '.join(repr(w) for w in WRAPPERS)}"
        )
    if others:
        raise WeightsError(
            f"{path}: the state dict mixes tensors with other values ({_few(others)})"
        )
    return weights, form


def _strip_prefix(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in weights):
            return {k[len(prefix) :]: v for k, v in weights.items()}, prefix
    return weights, ""


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > SHOWN else shown


def check_fit(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    config: ModelConfig,
    expected: Mapping[str, torch.Tensor],
) -> None:
    """Refuse weights that are not, key for key and shape for shape, ``expected`` (the state
    dict ``config``'s VAE has)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k} {tuple(weights[k].shape)} (the config builds {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} of another shape: {_few(shapes)}")
    other = "maisi" if config.vae.arch == "autoencoder" else "autoencoder"
    if set(build_vae(config.vae.model_copy(update={"arch": other})).state_dict()) == set(weights):
        problems.append(f"the names are those of vae.arch {other}")
    raise WeightsError(
        f"{path}: not the VAE of model config {config.name!r} (vae.arch {config.vae.arch}, "
        f"channels {list(config.vae.channels)}, latent_channels {config.vae.latent_channels}): "
        + "; ".join(problems)
        + ". Choose the model config these weights were made for (--config)"
    )


def import_vae(
    path: str | Path,
    config: ModelConfig,
    out: str | Path,
    license: str,
    name: str | None = None,
    description: str = "",
) -> tuple[str, Source]:
    """Write ``path``'s autoencoder weights as a ct-factory checkpoint at ``out`` holding the
    VAE alone, its card naming the source file, its sha256 and ``license``; returns the
    checkpoint's content hash and what was read."""
    weights, source = read_weights(path)
    expected = build_vae(config.vae).state_dict()
    check_fit(source.path, weights, config, expected)
    weights = {k: v.to(expected[k].dtype).contiguous() for k, v in weights.items()}
    card = ModelCard(
        name=name or Path(out).name,
        description=description
        or f"A {config.vae.arch} VAE imported from {source.path.name} by `ctfactory "
        "import-model`; train a diffusion model on top of it (docs/training.md).",
        license=license,
        training_data="(that of the source weights; see their publisher)",
        extra={
            "imported": {
                "file": source.path.name,
                "sha256": source.sha256,
                "form": source.form,
                "prefix_removed": source.prefix,
                "tensors": len(weights),
            }
        },
    )
    return save_checkpoint(out, config, {"vae": weights}, card), source
