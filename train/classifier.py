"""Classifier task: the finding classifier learns multi-label BCE on (volume, labels) pairs; its
yardstick is per-finding AUC on the held-out split.

Left-right flips are the only augmentation (the labels say whether a finding is there, not on
which side). ``train_func`` is the per-worker function; pass a ``LocalSession`` to run it
without Ray.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory import vocab
from factory.evaluate.metrics import factual_correctness
from factory.models.classifier import FindingClassifier
from train.config import TrainConfig
from train.loop import Session, fit, split_decay
from train.vae import held_out_rows

LR_AXIS = 2  # (B, 1, x, y, z): x runs right to left (RAS)


def batch_labels(batch: dict, columns: list[int]) -> torch.Tensor:
    """(B, F) float targets: the dataset's 18 labels (vocabulary order) at ``columns``."""
    labels = np.stack([np.asarray(v) for v in batch["labels"]]).astype(np.float32)
    return torch.from_numpy(labels[:, columns])


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each volume flipped left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None, None], x.flip(LR_AXIS), x)


class ClassifierTask:
    name = "classifier"
    network = "classifier"

    def __init__(self, cfg: TrainConfig, device: torch.device, held_out: list[dict] | None = None):
        self.cfg = cfg
        self.model_cfg = cfg.architecture()
        self.device = device
        self.held_out = held_out or []
        self.columns = [vocab.COLUMNS.index(c) for c in self.model_cfg.classifier.findings]

    def model(self) -> nn.Module:
        return FindingClassifier(self.model_cfg)

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        x = torch.as_tensor(batch["image"])
        if self.cfg.classifier.flip:
            x = random_flip(x, gen)
        target = batch_labels(batch, self.columns).to(self.device)
        logits = model(x.to(self.device))
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Held-out macro AUC and precision, and the AUC of each finding that has both classes."""
        if len(self.held_out) < 2:
            return {}
        was = module.training
        module.eval()
        probs = torch.cat(
            [
                torch.sigmoid(module(torch.as_tensor(r["image"])[None].to(self.device))).cpu()
                for r in self.held_out
            ]
        ).numpy()
        module.train(was)
        labels = batch_labels({"labels": [r["labels"] for r in self.held_out]}, self.columns)
        scores = factual_correctness(
            probs, labels.numpy(), self.model_cfg.classifier.findings, self.cfg.classifier.threshold
        )
        out = {"macro_auc": scores["macro_auc"], "macro_precision": scores["macro_precision"]}
        for name, v in scores["per_finding"].items():
            if not np.isnan(v["auc"]):
                out[f"auc/{name}"] = v["auc"]
        return out

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.state_dict()

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(state)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        return split_decay(module, weight_decay, set())


def export_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint networks: ``classifier``."""
    return {"classifier": state}


def train_func(config: dict, session: Session | None = None) -> None:
    """Per-worker entry point: ``config`` is ``{"config": TrainConfig dict, "rows": N, ...}``."""
    from train.session import RaySession

    cfg = TrainConfig.model_validate(config["config"])
    session = session or RaySession(cfg)
    held_out = held_out_rows(cfg) if session.rank == 0 else []
    fit(ClassifierTask(cfg, session.device, held_out), cfg, session, config["rows"], {})
