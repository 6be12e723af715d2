"""Pertinent negatives in report-style prompts, split off the affirmed text.

A small frozen sentence encoder embeds "no pleural effusion" close to "pleural effusion": both
say *pleural effusion*, and a tiny UNet trained on CT reports (where nearly every report lists
"No pleural effusion.") learns the words, not the "no" (docs/models.md, "Negation"). With
``text.negations: guide`` the model trains on the affirmed text only and the generator turns
the negated findings into a negative prompt for classifier-free guidance, so "no X" steers
away from X instead of towards it.

The rules are NegEx's in miniature, for the short declarative sentences of chest CT reports:

- text splits into sentences and clauses at ``. ! ? ; :``, newlines and ", but" / "however";
- a *leading* cue (``no``, ``without``, ``negative for``, ``free of``, ``absence of``, ``nor``)
  negates the rest of its clause; the words before it stay affirmed ("normal calibre without
  wall calcification");
- a *trailing* cue (``not``, ``absent``, ``ruled out``, ``excluded``) negates the whole clause
  ("Pleural effusion is not seen.");
- after a comma a negation carries on through a list ("no effusion, pneumothorax or
  consolidation") until a part that affirms something: a severity or size word, a number, or
  a verb ("no effusion, severe cardiomegaly").

"cannot be excluded" and "no longer" are hedges, not negations, and are left affirmed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOUNDARY = re.compile(r"[.!?](?=\s|$)|[;:\n]|,?\s+(?:but|however|whereas)\b", re.I)
COMMA = re.compile(",")
LEADING = re.compile(
    r"\b(?:there (?:is|are|was|were) no|no|without|negative for|free of|absence of|nor)\b"
    r"(?! longer)",
    re.I,
)
TRAILING = re.compile(r"\b(?:not|absent|ruled out|(?<!cannot be )excluded)\b", re.I)
HEDGE = re.compile(r"\b(?:cannot|can not|could not) be excluded\b", re.I)
# A comma part with one of these words states something, so a negation stops before it.
AFFIRMS = re.compile(
    r"\d|\b(?:is|are|was|were|has|have|shows?|seen|noted|present|mild|moderate|severe|"
    r"large|small|trace|massive|enlarged|increased|decreased|dilated|bilateral|left|right)\b",
    re.I,
)


@dataclass(frozen=True)
class Negations:
    """A prompt's affirmed text and the findings it negates, each as plain text."""

    affirmed: str
    negated: str


def _spans(text: str, pattern: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut at ``pattern``'s matches, as (start, end) spans."""
    out, at = [], start
    for m in pattern.finditer(text, start, end):
        out.append((at, m.start()))
        at = m.end()
    out.append((at, end))
    return out


def _negated(text: str, start: int, end: int) -> list[tuple[int, int, str]]:
    """The negated spans of one clause, each with the negated words (cues taken out)."""
    if HEDGE.search(text, start, end):
        return []
    out: list[tuple[int, int, str]] = []
    negating = False
    for a, b in _spans(text, COMMA, start, end):
        part = text[a:b]
        lead = LEADING.search(part)
        if lead:
            out.append((a + lead.start(), b, part[lead.end() :]))
            negating = True
        elif TRAILING.search(part):
            out.append((a, b, TRAILING.sub(" ", part)))
            negating = True
        elif negating and not AFFIRMS.search(part):
            out.append((a - 1, b, part))  # the comma goes with it
        else:
            negating = False
    return out


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",?\s+(?:but|however|whereas)(?=[.!?;:,]|$)", "", text, flags=re.I)
    text = re.sub(r"([,;:])(?=[.!?;:,]|$)", "", text)  # a separator left with nothing after it
    text = re.sub(r"(^|[.!?;:])[\s.,;:]*[.,]", r"\1", text)  # a sentence left empty
    return text.strip(" ,;:")


def split_negations(text: str) -> Negations:
    """Split ``text`` into what it affirms and what it negates (see the module docstring).

    Text without negations comes back unchanged as ``affirmed``.
    """
    cuts: list[tuple[int, int, str]] = []
    for a, b in _spans(text, BOUNDARY, 0, len(text)):
        cuts.extend(_negated(text, a, b))
    if not cuts:
        return Negations(text, "")
    kept, at = [], 0
    for a, b, _ in cuts:
        kept.append(text[at:a])
        at = b
    kept.append(text[at:])
    negated = [re.sub(r"\s+", " ", words).strip(" ,.;:") for _, _, words in cuts]
    phrases = [w for w in negated if w]
    return Negations(_tidy("".join(kept)), ". ".join(phrases) + ("." if phrases else ""))


def conditioning(prompt: str, negations: str) -> Negations:
    """What the UNet is conditioned on for ``prompt`` under a model's ``text.negations``:
    ``guide`` splits the negations off, ``keep`` passes the prompt through whole."""
    return split_negations(prompt) if negations == "guide" else Negations(prompt, "")
