"""Negation splitting: the rules on hand-written prompts and on every phrase of the vocabulary."""

from __future__ import annotations

import random
import re

import pytest

from factory import vocab
from factory.cohort.prompts import build_prompt
from factory.models.negation import Negations, conditioning, split_negations


@pytest.mark.parametrize(
    ("text", "affirmed", "negated"),
    [
        ("no pleural effusion", "", "pleural effusion."),
        ("There is no pleural effusion.", "", "pleural effusion."),
        ("Mild cardiomegaly. No pleural effusion.", "Mild cardiomegaly.", "pleural effusion."),
        ("no pleural effusion, severe cardiomegaly", "severe cardiomegaly", "pleural effusion."),
        (
            "No pleural effusion, pneumothorax or consolidation.",
            "",
            "pleural effusion. pneumothorax or consolidation.",
        ),
        (
            "The thoracic aorta has a normal calibre without wall calcification.",
            "The thoracic aorta has a normal calibre.",
            "wall calcification.",
        ),
        (
            "The trachea is open; no obstructive lesion is seen.",
            "The trachea is open.",
            "obstructive lesion is seen.",
        ),
        ("Pleural effusion is not seen.", "", "Pleural effusion is seen."),
        ("Pleural effusion, but no pneumothorax.", "Pleural effusion.", "pneumothorax."),
        (
            "62 years old male: Mild cardiomegaly. No emphysema.",
            "62 years old male: Mild cardiomegaly.",
            "emphysema.",
        ),
    ],
)
def test_rules(text: str, affirmed: str, negated: str) -> None:
    got = split_negations(text)
    assert (got.affirmed, got.negated) == (affirmed, negated)


@pytest.mark.parametrize(
    "text",
    [
        "large bilateral pleural effusion",
        "Pneumonia cannot be excluded.",
        "A 4.9 mm solid nodule in the right lower lobe.",
        "Heart size is normal.",
        "Nodular opacity, no longer visible",  # "no longer" is not a negation of a finding
        "",
    ],
)
def test_text_without_negations_is_unchanged(text: str) -> None:
    assert split_negations(text).affirmed == text
    assert split_negations(text).negated == ""


def test_keep_passes_the_prompt_through() -> None:
    assert conditioning("no pleural effusion", "keep") == Negations("no pleural effusion", "")
    assert conditioning("no pleural effusion", "guide").negated == "pleural effusion."


def _attribute_draws(finding: vocab.Finding, n: int) -> list[dict]:
    rng = random.Random(finding.id)
    return [vocab.complete_attributes(finding.id, {}, rng) for _ in range(n)]


NEGATION_WORD = re.compile(r"\b(?:no|not|without)\b", re.I)


@pytest.mark.parametrize("finding", vocab.FINDINGS, ids=lambda f: f.id)
def test_vocabulary_phrases_split_cleanly(finding: vocab.Finding) -> None:
    """Every way the reports say a finding is there stays affirmed; every way they say it is
    not is either a plain normal statement or loses its negation: the diffusion model trains on
    what this function keeps."""
    for attrs in _attribute_draws(finding, 12):
        for template in (*finding.present, *finding.impression):
            text = vocab.render_phrase(template, finding.id, attrs)
            assert split_negations(text) == Negations(text, ""), text
    for text in finding.absent:
        got = split_negations(text)
        assert not NEGATION_WORD.search(got.affirmed), text
        assert got.negated or got.affirmed == text, text


def test_reports_keep_every_affirmed_sentence() -> None:
    """Whole phantom-style reports: every negation goes, every other sentence stays verbatim."""
    rng = random.Random(3)
    for _ in range(40):
        labels = {f.id: int(rng.random() < 0.3) for f in vocab.FINDINGS}
        attributes = {
            fid: vocab.complete_attributes(fid, {}, rng) for fid, on in labels.items() if on
        }
        report = build_prompt("report", labels, attributes, 60, "F", rng)
        got = split_negations(report)
        assert not NEGATION_WORD.search(got.affirmed), got.affirmed
        assert got.negated.count(".") >= report.count(" No ")
        for sentence in re.split(r"(?<=\.)\s+|:\s*", report):
            if not NEGATION_WORD.search(sentence) and ";" not in sentence:
                assert sentence in got.affirmed, sentence
