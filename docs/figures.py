"""Regenerate the pictures in docs/phantom.md: one montage per finding, plus a normal subject.

.venv/bin/python docs/figures.py
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from factory import vocab
from factory.phantom.dataset import default_grid, finding_title, preview_center
from factory.phantom.render import render_phantom
from factory.viz import montage

OUT = Path(__file__).parent / "images" / "phantom"
GRID = default_grid((192, 192, 160), None)  # 2 x 2 x 2 mm
SHOWN = {  # a clearly visible version of each finding
    "medical_material": {"device": "pacemaker"},
    "lung_nodule": {"size_mm": 14, "lobe": "RUL", "count": 2},
    "pleural_effusion": {"laterality": "left", "severity": "large"},
    "atelectasis": {"laterality": "right", "severity": "moderate"},
    "lung_opacity": {"laterality": "bilateral", "severity": "moderate"},
    "hiatal_hernia": {"size_mm": 50},
    "lymphadenopathy": {"station": "subcarinal", "size_mm": 24, "count": 3},
    "consolidation": {"lobe": "RLL"},
    "bronchiectasis": {"laterality": "bilateral", "severity": "severe"},
}


def main(out: Path = OUT, only: Collection[str] | None = None) -> list[Path]:
    """Write the montages (all of them, or the cases named in ``only``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = {"normal": {}} | {fid: {fid: SHOWN.get(fid, {})} for fid in vocab.FINDING_IDS}
    written = []
    for name, chosen in cases.items():
        findings = {fid: vocab.complete_attributes(fid, a, rng) for fid, a in chosen.items()}
        if name != "normal" and "severity" in vocab.BY_ID[name].attributes and name not in SHOWN:
            findings[name]["severity"] = vocab.BY_ID[name].attributes["severity"].choices[-1]
        if only is not None and name not in only:
            continue  # after drawing its attributes, so the other cases see the same stream
        phantom = render_phantom(GRID, findings, "M", 64, 2)
        caption = f"{finding_title(findings)}; measurements: {phantom.truth['measurements']}"
        path = montage(
            phantom.image,
            GRID.spacing,
            caption,
            out / f"{name}.png",
            center=preview_center(phantom.truth, GRID),
            title=name.replace("_", " "),
            dpi=72,
        )
        print(path)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
