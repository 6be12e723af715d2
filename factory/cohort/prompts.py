"""Report and prompt text from labels, attributes and demographics.

Pure Python. Every function draws from ``rng.random()`` only, so a ``random.Random`` or a numpy
``Generator`` gives reproducible text. No text ever says "None": a report without findings
reads like a normal CT-RATE report, with pertinent negatives.

Three prompt styles (:func:`build_prompt`): ``structured`` (GenerateCT: "{age} years old
{sex}: {impression}"), ``report`` (CT-RATE Findings and Impression) and ``free`` (Text2CT-like:
demographics, findings and impression sections, each kept or dropped, shuffled, with varied
headers and wording).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Literal, get_args

from factory import vocab
from factory.vocab import UniformSource

PromptStyle = Literal["structured", "report", "free"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)
SEX_WORDS: dict[str, str] = {"M": "male", "F": "female"}

# Sentences that describe normal anatomy not covered by any finding, per report section.
NORMAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "airways": (
        "Trachea and both main bronchi are in the midline and patent.",
        "The trachea and main bronchi are open; no obstructive lesion is seen.",
    ),
    "mediastinum": (
        "Mediastinal main vascular structures have a normal calibre.",
        "Mediastinal structures are unremarkable.",
    ),
    "heart": ("The heart is in its usual position.", "Cardiac position is normal."),
    "lungs": (
        "Aeration of both lungs is normal.",
        "The lung parenchyma is clear.",
    ),
    "pleura": ("Pleural surfaces are smooth.",),
    "abdomen": (
        "Upper abdominal organs within the imaging area are unremarkable.",
        "Sections through the upper abdomen show no abnormality.",
    ),
    "devices": (
        "Bone structures in the imaging area are intact.",
        "No lytic or destructive bone lesion is seen.",
    ),
}

NORMAL_IMPRESSIONS: tuple[str, ...] = (
    "No acute cardiopulmonary abnormality.",
    "Unremarkable non-contrast chest CT.",
    "No significant pathological finding in the thorax.",
    "Normal chest CT examination.",
)

CLINICAL_INFORMATION: tuple[str, ...] = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Follow-up.",
    "Fever and cough.",
    "Screening.",
    "Dyspnoea on exertion.",
    "Preoperative evaluation.",
)


# The findings of each report section, in the order a CT-RATE report walks the chest.
_SECTION_MEMBERS: dict[str, tuple[vocab.Finding, ...]] = {
    section: tuple(f for f in vocab.FINDINGS if f.section == section) for section in vocab.SECTIONS
}


def pick(options: Sequence[str], rng: UniformSource) -> str:
    """One of ``options``, drawn with a single ``rng.random()`` call."""
    k = len(options)
    return options[min(int(rng.random() * k), k - 1)]


def positives(labels: Mapping[str, int]) -> list[str]:
    """Ids of present findings in vocabulary order (labels keyed by id or CT-RATE column)."""
    present = {k if k in vocab.BY_ID else vocab.resolve(k) for k, v in labels.items() if int(v)}
    return [fid for fid in vocab.FINDING_IDS if fid in present]


@lru_cache(maxsize=1 << 16)
def _context(fid: str, attrs: tuple[tuple[str, object], ...]) -> dict[str, str]:
    return vocab.phrase_context(fid, dict(attrs))


def _render(template: str, fid: str, attrs: Mapping[str, object]) -> str:
    """``vocab.render_phrase`` with the phrase context cached: a cohort's prompts repeat it."""
    return template.format(**_context(fid, tuple(attrs.items())))


def finding_sentence(fid: str, attrs: Mapping[str, object], rng: UniformSource) -> str:
    """One findings-section sentence for a present finding."""
    return _render(pick(vocab.BY_ID[fid].present, rng), fid, attrs)


def impression_phrase(fid: str, attrs: Mapping[str, object], rng: UniformSource) -> str:
    """One impression phrase for a present finding."""
    return _render(pick(vocab.BY_ID[fid].impression, rng), fid, attrs)


def findings_text(
    labels: Mapping[str, int],
    attributes: Mapping[str, Mapping[str, object]],
    rng: UniformSource,
    negatives: float = 0.6,
) -> str:
    """CT-RATE style Findings: anatomy in report order, positives, and pertinent negatives.

    Each absent finding is mentioned as a negative with probability ``negatives``.
    """
    present = set(positives(labels))
    sentences: list[str] = []
    for section, members in _SECTION_MEMBERS.items():
        section_sentences: list[str] = []
        normal = True
        for f in members:
            if f.id in present:
                normal = False
                section_sentences.append(finding_sentence(f.id, attributes.get(f.id, {}), rng))
            elif f.absent and rng.random() < negatives:
                section_sentences.append(pick(f.absent, rng))
        if normal:
            sentences.append(pick(NORMAL_SENTENCES[section], rng))
        sentences.extend(section_sentences)
    return " ".join(sentences)


def impression_text(
    labels: Mapping[str, int], attributes: Mapping[str, Mapping[str, object]], rng: UniformSource
) -> str:
    """CT-RATE style Impression: the present findings, or a normal statement."""
    present = positives(labels)
    if not present:
        return pick(NORMAL_IMPRESSIONS, rng)
    return " ".join(impression_phrase(fid, attributes.get(fid, {}), rng) for fid in present)


def technique_text(spacing_mm: Sequence[float], rng: UniformSource) -> str:
    """A Technique_EN sentence that states the real slice thickness."""
    slice_mm = f"{float(spacing_mm[2]):g}"
    return pick(
        (
            f"Non-contrast chest CT, axial sections of {slice_mm} mm.",
            f"Thorax CT without contrast was obtained with {slice_mm} mm slice thickness.",
            f"Chest CT was performed without intravenous contrast ({slice_mm} mm sections).",
        ),
        rng,
    )


# Free style: how each section may be introduced, and how demographics may be worded.
FREE_HEADERS: dict[str, tuple[str, ...]] = {
    "demographics": ("Patient:", "Demographics:", "Clinical data:", ""),
    "findings": ("Findings:", "FINDINGS:", "Observations:", "CT findings:", ""),
    "impression": ("Impression:", "IMPRESSION:", "Conclusion:", "Summary:", ""),
}
FREE_DEMOGRAPHICS: tuple[str, ...] = (
    "{age}-year-old {person}.",
    "{Sex}, {age} years.",
    "A {age} year old {sex} patient.",
    "Age {age}, sex {sex}.",
)
FREE_KEEP = 0.75  # chance that each section appears in a free-style prompt
FREE_NEGATIVES: tuple[float, ...] = (0.0, 0.3, 0.6)  # pertinent-negative rates to vary length


def structured_text(
    labels: Mapping[str, int],
    attributes: Mapping[str, Mapping[str, object]],
    age: int,
    sex: str,
    rng: UniformSource,
) -> str:
    """GenerateCT's prompt: ``{age} years old {sex}: {impression}``."""
    return f"{int(age)} years old {SEX_WORDS[sex]}: {impression_text(labels, attributes, rng)}"


def report_text(
    labels: Mapping[str, int], attributes: Mapping[str, Mapping[str, object]], rng: UniformSource
) -> str:
    """A CT-RATE report as a prompt: ``Findings: ... Impression: ...``."""
    findings = findings_text(labels, attributes, rng)
    return f"Findings: {findings} Impression: {impression_text(labels, attributes, rng)}"


def _demographics_sentence(age: int, sex: str, rng: UniformSource) -> str:
    word = SEX_WORDS[sex]
    person = "man" if sex == "M" else "woman"
    template = pick(FREE_DEMOGRAPHICS, rng)
    return template.format(age=int(age), sex=word, Sex=word.capitalize(), person=person)


def free_text(
    labels: Mapping[str, int],
    attributes: Mapping[str, Mapping[str, object]],
    age: int,
    sex: str,
    rng: UniformSource,
) -> str:
    """A Text2CT-like prompt: sections kept or dropped, shuffled, with varied wording.

    At least one of findings and impression is kept, so every present finding is named.
    """
    keep = {name: float(rng.random()) < FREE_KEEP for name in FREE_HEADERS}
    if not (keep["findings"] or keep["impression"]):
        keep[pick(("findings", "impression"), rng)] = True
    bodies = {
        "demographics": lambda: _demographics_sentence(age, sex, rng),
        "findings": lambda: findings_text(labels, attributes, rng, pick(FREE_NEGATIVES, rng)),
        "impression": lambda: impression_text(labels, attributes, rng),
    }
    sections = [name for name in FREE_HEADERS if keep[name]]
    for i in range(len(sections) - 1, 0, -1):  # Fisher-Yates with the caller's rng
        j = min(int(float(rng.random()) * (i + 1)), i)
        sections[i], sections[j] = sections[j], sections[i]
    parts = []
    for name in sections:
        header = pick(FREE_HEADERS[name], rng)
        body = bodies[name]()
        parts.append(f"{header} {body}" if header else body)
    return pick((" ", "\n"), rng).join(parts)


def build_prompt(
    style: PromptStyle,
    labels: Mapping[str, int],
    attributes: Mapping[str, Mapping[str, object]],
    age: int,
    sex: str,
    rng: UniformSource,
) -> str:
    """The prompt of one volume in ``style``, from its labels, attributes and demographics.

    ``labels`` are keyed by finding id or CT-RATE column; ``sex`` is ``M`` or ``F``.
    """
    if style == "structured":
        return structured_text(labels, attributes, age, sex, rng)
    if style == "report":
        return report_text(labels, attributes, rng)
    if style == "free":
        return free_text(labels, attributes, age, sex, rng)
    raise ValueError(f"unknown prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")
