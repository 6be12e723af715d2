"""Label verification in the factory: the finding classifier checks each generated volume
against its labels before it is stored; a volume that fails is generated again from a new
derived seed until it passes or the attempts run out.

A checked finding passes when the classifier's probability is at least the threshold for a
volume labelled with it, and below the threshold for one labelled without it. The seed of
attempt k is derived from the volume's planned seed and k alone, so a resumed or re-split run
makes the same attempts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Check:
    """One volume's verdict: passed, the checked findings that failed, their probabilities."""

    passed: bool
    failed: list[str]
    scores: dict[str, float]


class Verifier:
    """The classifier and the rule of a cohort spec's ``verify`` block, loaded once per actor."""

    def __init__(
        self,
        classifier_ref: str,
        findings: Sequence[str],
        threshold: float,
        device=None,
        storage_options: dict | None = None,
    ):
        from factory.models.checkpoint import load_checkpoint
        from factory.models.classifier import from_checkpoint

        checkpoint = load_checkpoint(classifier_ref, storage_options=storage_options)
        self.hash = checkpoint.hash
        self.classifier = from_checkpoint(checkpoint, device)
        self.findings = list(findings)
        self.outputs = self.classifier.columns(self.findings)  # LabelSetError if missing
        self.threshold = threshold

    def check(self, volumes: Sequence[np.ndarray], labels: Sequence[Mapping[str, int]]) -> list:
        """A :class:`Check` for each HU volume against its labels (CT-RATE columns)."""
        probs = self.classifier.probabilities(np.stack(volumes))[:, self.outputs]
        out = []
        for p, row in zip(probs, labels, strict=True):
            scores = {f: round(float(v), 4) for f, v in zip(self.findings, p, strict=True)}
            failed = [
                f for f in self.findings if (scores[f] >= self.threshold) != bool(int(row[f]))
            ]
            out.append(Check(not failed, failed, scores))
        return out
