"""CLIP task: the 3D vision tower and projection heads (and the text tower, if asked) learn
symmetric InfoNCE on (volume, text) pairs; retrieval on a held-out split is its yardstick.

Texts that are identical within a batch are all positives of each other (two normal volumes
with the same impression are not negatives). ``train_func`` is the per-worker function.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from factory.evaluate.metrics import recall_at
from factory.models.clip import CLIP3D, MAX_LOGIT_SCALE
from factory.models.text import TextEncoder
from train.config import TrainConfig
from train.data import choose_texts
from train.loop import Session, fit, split_decay
from train.vae import held_out_rows


def matching(texts: list[str]) -> torch.Tensor:
    """(B, B) soft targets: row i spreads over every j whose text equals text i."""
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    return same / same.sum(1, keepdim=True)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gathered(rows: torch.Tensor) -> torch.Tensor:
    """(B, E) rows of every worker, concatenated in rank order; gradients flow back to each
    worker's own rows (OpenCLIP's ``gather_with_grad``). One worker: ``rows`` itself."""
    if _world() == 1:
        return rows
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(rows))


def gathered_texts(texts: list[str]) -> list[str]:
    """The texts of every worker's micro-batch, in rank order."""
    if _world() == 1:
        return texts
    every: list[list[str] | None] = [None] * _world()
    dist.all_gather_object(every, texts)
    return [t for chunk in every for t in chunk]  # type: ignore[union-attr]


class CLIPStep(nn.Module):
    """The contrastive loss as one forward pass (what DDP wraps). Across workers the embeddings
    are gathered, so every worker's micro-batch is a negative of every other's: the contrastive
    batch is workers x micro-batch, and 2 workers at 4 learn exactly as 1 worker at 8 (each
    computes the whole loss; DDP's gradient mean over workers undoes the gather's sum)."""

    def __init__(self, clip: CLIP3D):
        super().__init__()
        self.clip = clip

    def forward(self, volumes: torch.Tensor, texts: list[str]) -> torch.Tensor:
        image = gathered(self.clip.encode_image(volumes).float())
        text = gathered(self.clip.encode_text(texts).float())
        texts = gathered_texts(texts)
        scale = self.clip.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
        logits = scale * image @ text.T
        target = matching(texts).to(logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIPTask:
    name = "clip"
    network = "clip"

    def __init__(self, cfg: TrainConfig, device: torch.device, held_out: list[dict] | None = None):
        self.cfg = cfg
        self.model_cfg = cfg.architecture()
        self.device = device
        self.held_out = held_out or []

    def model(self) -> nn.Module:
        text = TextEncoder.from_config(self.model_cfg.text)
        if not self.cfg.clip.train_text:
            text = text.frozen()
        return CLIPStep(CLIP3D.from_config(self.model_cfg, text, self.cfg.clip.train_text))

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        texts = choose_texts(batch, self.cfg.data.text, gen, self.cfg.data.excerpts)
        return model(torch.as_tensor(batch["image"]).to(self.device), texts)

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Report-to-volume and volume-to-report Recall@K on the held-out split."""
        if len(self.held_out) < 2:
            return {}
        clip = module.clip
        image = torch.cat(
            [
                clip.encode_image(torch.as_tensor(r["image"])[None].to(self.device))
                for r in self.held_out
            ]
        )
        text = clip.encode_text([r["report"] for r in self.held_out])
        sim = (image.float() @ text.float().T).cpu()
        out = {}
        for k in self.cfg.clip.recall_k:
            out[f"text_to_image_r{k}"] = recall_at(sim.T, k)
            out[f"image_to_text_r{k}"] = recall_at(sim, k)
        return out

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.clip.trainable_state_dict()

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.clip.load_trainable_state_dict(state)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        return split_decay(module, weight_decay, {"clip.logit_scale"})


def export_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint networks: ``clip`` (vision tower, heads, temperature) and, if it trained,
    ``text`` (the text tower, in ``TextEncoder`` keys)."""
    out = {"clip": {k: v for k, v in state.items() if not k.startswith("text.")}}
    text = {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
    if text:
        out["text"] = text
    return out


def train_func(config: dict, session: Session | None = None) -> None:
    """Per-worker entry point: ``config`` is ``{"config": TrainConfig dict, "rows": N, ...}``."""
    from train.session import RaySession

    cfg = TrainConfig.model_validate(config["config"])
    session = session or RaySession(cfg)
    held_out = held_out_rows(cfg) if session.rank == 0 else []
    fit(CLIPTask(cfg, session.device, held_out), cfg, session, config["rows"], {})
