"""From a training run to a model checkpoint (``factory.models.checkpoint`` format).

The newest checkpoint of the run gives the weights (the EMA when the run kept one), the
config and the history; a diffusion run adds the VAE it trained on (whose latent scale factor
it records) and, when its config names one, the CLIP. The model card states the data, steps,
wall time and final metrics.
"""

from __future__ import annotations

import statistics
import tempfile
import uuid
from pathlib import Path

import pandas as pd

from factory.errors import CtFactoryError
from factory.models.card import ModelCard
from factory.models.checkpoint import load_checkpoint, save_checkpoint, upload_checkpoint
from factory.refs import is_local, ref_options
from train import classifier, clip, diffusion, vae
from train.config import TrainConfig
from train.loop import EMA, META_FILE
from train.session import newest_state

EXPORTS = {
    "vae": vae.export_weights,
    "clip": clip.export_weights,
    "classifier": classifier.export_weights,
    "diffusion": diffusion.export_weights,
}


class ExportError(CtFactoryError, ValueError):
    """A run that cannot be exported; the message names the run and what is missing."""


def latest_checkpoint(run: str, storage_options: dict | None = None) -> dict:
    """The state of the newest complete checkpoint (highest step) under a run URL or directory."""
    try:
        state = newest_state(run, storage_options or {})
    except Exception as exc:
        raise ExportError(f"{run}: cannot read: {exc}") from None
    if state is None:
        raise ExportError(f"{run}: no checkpoints (checkpoint_*/{META_FILE}); is it a run?")
    return state


def final_metrics(history: list[dict], window: int = 20) -> dict[str, float]:
    """The mean loss of the last ``window`` steps and the latest value of each eval metric."""
    if not history:
        return {}
    out = {"loss": statistics.fmean(r["loss"] for r in history[-window:])}
    for record in history:
        out.update({k: v for k, v in record.items() if k.startswith("eval/")})
    return out


def training_labels(cfg: TrainConfig, scratch: Path) -> Path | None:
    """The training splits' label CSVs as one (the model's ``labels.csv``, the reference a
    cohort spec's ``reference: model`` matches), in a scratch file; None if any is missing."""
    frames = []
    for split in cfg.data.split:
        path = Path(cfg.data.root) / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        if not path.is_file():
            return None
        frames.append(pd.read_csv(path))
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f".labels-{uuid.uuid4().hex[:8]}.csv"
    pd.concat(frames).to_csv(target, index=False)
    return target


def export_model(
    run: str,
    out: str | Path,
    name: str | None = None,
    storage_options: dict | None = None,
    description: str | None = None,
    limitations: str = "",
) -> str:
    """Write the run's model to ``out`` (a directory, or a URL such as ``s3://...`` written
    with ``storage_options``); returns the checkpoint's content hash. ``description`` and
    ``limitations`` replace the card's generic text (what the model is, honestly)."""
    with tempfile.TemporaryDirectory(prefix="ctfactory-export-") as scratch:
        return _export(run, out, Path(scratch), name, storage_options, description, limitations)


def _export(
    run: str,
    out: str | Path,
    scratch: Path,
    name: str | None,
    storage_options: dict | None,
    description: str | None,
    limitations: str,
) -> str:
    state = latest_checkpoint(run, storage_options)
    meta = state["meta"]
    cfg = TrainConfig.model_validate(meta["config"])
    model = cfg.architecture()
    weights = state["model"]
    if state.get("ema") is not None:
        ema = EMA(weights, cfg.ema_decay or 0.5)
        ema.load_state_dict(state["ema"])
        weights = ema.apply_to(weights)
    networks = EXPORTS[cfg.task](weights)
    sources = {}
    labels = None
    if cfg.task == "diffusion":
        scale = float(meta["extra"]["scale_factor"])
        model = model.model_copy(
            update={"vae": model.vae.model_copy(update={"scale_factor": scale})}
        )
        vae_ckpt = load_checkpoint(
            cfg.diffusion.vae, storage_options=ref_options(cfg.diffusion.vae, cfg.storage_options)
        )
        networks["vae"] = vae_ckpt.state_dict("vae")
        sources["vae"] = {
            "ref": cfg.diffusion.vae,
            "hash": vae_ckpt.hash,
            "steps": vae_ckpt.card.steps,
        }
        if cfg.diffusion.clip:
            clip_ckpt = load_checkpoint(
                cfg.diffusion.clip,
                storage_options=ref_options(cfg.diffusion.clip, cfg.storage_options),
            )
            networks.update({k: v for k, v in clip_ckpt.weights.items() if k in ("clip", "text")})
            sources["clip"] = {"ref": cfg.diffusion.clip, "hash": clip_ckpt.hash}
        labels = training_labels(cfg, scratch)
    history = state["history"]
    rows = meta["extra"].get("latents", {})
    card = ModelCard(
        name=name or f"{cfg.run_name}",
        description=description
        or f"ct-factory {cfg.task} model ({cfg.model} config), trained by `ctfactory train "
        f"{cfg.task}`.",
        training_data=f"{cfg.data.root}, split(s) {', '.join(cfg.data.split)} (CT-RATE layout)"
        + (
            f"; evaluated (eval/* metrics) on held-out split(s) {', '.join(cfg.data.held_out)}, "
            f"at most {cfg.data.held_out_limit} volumes each"
            if cfg.data.held_out
            else ""
        ),
        limitations=limitations,
        steps=int(meta["step"]),
        metrics=final_metrics(history),
        extra={
            "task": cfg.task,
            "wall_s": round(float(meta["wall_s"]), 1),
            "global_batch": cfg.batch_size,
            "world_sizes": sorted({int(r["world_size"]) for r in history}),
            "ema_decay": cfg.ema_decay,
            "optim": cfg.optim.model_dump(mode="json"),
            "sources": sources,
            "latents": rows,
        },
    )
    if is_local(str(out)):
        return save_checkpoint(out, model, networks, card, labels)
    target = scratch / "model"  # object storage: saved here, then uploaded
    digest = save_checkpoint(target, model, networks, card, labels)
    upload_checkpoint(target, str(out), storage_options)
    return digest
