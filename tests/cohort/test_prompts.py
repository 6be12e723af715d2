"""Prompt builders: three styles, reproducible, every positive named, never "None"."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory import vocab
from factory.cohort import prompts

label_sets = st.lists(st.sampled_from(vocab.FINDING_IDS), unique=True, max_size=6)


def volume(present: list[str], seed: int) -> tuple[dict[str, int], dict[str, dict[str, object]]]:
    rng = random.Random(seed)
    labels = {f.column: int(f.id in present) for f in vocab.FINDINGS}
    attributes = {fid: vocab.complete_attributes(fid, {}, rng) for fid in present}
    return labels, attributes


@settings(max_examples=60, deadline=None)
@given(
    present=label_sets,
    seed=st.integers(0, 2**32),
    age=st.integers(*vocab.AGE_RANGE),
    sex=st.sampled_from(["M", "F"]),
    style=st.sampled_from(prompts.PROMPT_STYLES),
)
def test_prompts_are_clean_reproducible_and_name_every_positive(present, seed, age, sex, style):
    labels, attributes = volume(present, seed)
    text = prompts.build_prompt(style, labels, attributes, age, sex, random.Random(seed))
    assert text == prompts.build_prompt(style, labels, attributes, age, sex, random.Random(seed))
    assert "None" not in text and "{" not in text and "}" not in text
    assert "  " not in text and text == text.strip()
    impressions = [
        {vocab.render_phrase(t, fid, attributes[fid]) for t in vocab.BY_ID[fid].impression}
        | {vocab.render_phrase(t, fid, attributes[fid]) for t in vocab.BY_ID[fid].present}
        for fid in present
    ]
    for fid, phrases in zip(present, impressions, strict=True):
        assert any(p in text for p in phrases), (fid, text)


@settings(max_examples=30, deadline=None)
@given(present=label_sets, seed=st.integers(0, 2**32), age=st.integers(18, 102))
def test_structured_style_is_generatect_format(present, seed, age):
    labels, attributes = volume(present, seed)
    text = prompts.build_prompt("structured", labels, attributes, age, "F", random.Random(seed))
    match = re.fullmatch(rf"{age} years old female: (.+)", text)
    assert match
    assert match.group(1) == prompts.impression_text(labels, attributes, random.Random(seed))


def test_report_style_has_findings_and_impression():
    labels, attributes = volume(["pleural_effusion", "lung_nodule"], 3)
    text = prompts.build_prompt("report", labels, attributes, 60, "M", random.Random(1))
    assert text.startswith("Findings: ") and " Impression: " in text


def test_normal_volume_reads_like_a_normal_report():
    labels, attributes = volume([], 0)
    text = prompts.build_prompt("report", labels, attributes, 40, "M", random.Random(0))
    impression = text.split(" Impression: ")[1]
    assert impression in prompts.NORMAL_IMPRESSIONS


def test_free_style_varies_sections_order_and_wording():
    labels, attributes = volume(["atelectasis"], 5)
    texts = {
        prompts.build_prompt("free", labels, attributes, 71, "F", random.Random(s))
        for s in range(60)
    }
    assert len(texts) > 40
    firsts = {t.split()[0] for t in texts}
    assert {"Findings:", "Impression:"} & firsts and any(w[0].isdigit() for w in firsts)
    assert any("71" not in t for t in texts)  # demographics are sometimes left out


def test_numpy_generator_works_as_rng():
    labels, attributes = volume(["consolidation"], 2)
    a = prompts.build_prompt("free", labels, attributes, 50, "M", np.random.default_rng(4))
    b = prompts.build_prompt("free", labels, attributes, 50, "M", np.random.default_rng(4))
    assert a == b


def test_labels_keyed_by_id_or_column_give_the_same_text():
    by_column, attributes = volume(["emphysema", "hiatal_hernia"], 8)
    by_id = {vocab.resolve(k): v for k, v in by_column.items()}
    for style in prompts.PROMPT_STYLES:
        a = prompts.build_prompt(style, by_column, attributes, 66, "F", random.Random(2))
        b = prompts.build_prompt(style, by_id, attributes, 66, "F", random.Random(2))
        assert a == b


def test_report_pieces_keep_their_signatures():
    labels, attributes = volume(["pleural_effusion"], 1)
    rng = random.Random(0)
    assert "pleural" in prompts.findings_text(labels, attributes, rng, negatives=0.0).lower()
    assert prompts.impression_text(labels, attributes, rng)
    assert "1.5 mm" in prompts.technique_text((0.7, 0.7, 1.5), rng)


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="valid: structured, report, free"):
        prompts.build_prompt("poem", {}, {}, 50, "M", random.Random(0))  # type: ignore[arg-type]
