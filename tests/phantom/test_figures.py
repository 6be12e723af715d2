"""docs/figures.py, which draws the pictures in docs/phantom.md, still runs against the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

FIGURES = Path(__file__).parents[2] / "docs" / "figures.py"


def test_docs_figure_script_draws_the_montage_it_is_asked_for(tmp_path):
    spec = importlib.util.spec_from_file_location("docs_figures", FIGURES)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    written = figures.main(tmp_path, only={"pleural_effusion"})
    assert written == [tmp_path / "pleural_effusion.png"]
    with Image.open(written[0]) as png:
        assert png.format == "PNG" and min(png.size) > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pleural_effusion.png"]
