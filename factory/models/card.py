"""The model card: what a model is for and how it was made, stored with every checkpoint as
``model_card.md`` (for people) and ``model_card.json`` (for programs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelCard:
    """What a model is for and how it was made; stored as model_card.md and model_card.json."""

    name: str
    description: str = ""
    training_data: str = ""
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    intended_use: str = "Research on synthetic chest CT; not for clinical use."
    limitations: str = ""
    license: str = "Apache-2.0"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """The card as Markdown for people reading the checkpoint directory."""
        metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(self.metrics.items()))
        sections = [
            f"# {self.name}\n\n{self.description or '(no description)'}",
            f"License: {self.license}",
            f"## Training data\n\n{self.training_data or '(not recorded)'}",
            f"## Training\n\nSteps: {self.steps:,}",
            "## Metrics\n\n"
            + (f"| metric | value |\n|---|---|\n{metrics}" if metrics else "(none recorded)"),
            f"## Intended use\n\n{self.intended_use or '(not stated)'}",
            f"## Limitations\n\n{self.limitations or '(not stated)'}",
        ]
        if self.extra:
            extra = json.dumps(self.extra, indent=2, sort_keys=True)
            sections.append(f"## Extra\n\n```json\n{extra}\n```")
        return "\n\n".join(sections) + "\n"
