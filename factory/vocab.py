"""The 18 CT-RATE findings: names, attributes, report phrasings and reference statistics.

Pure Python (no numpy, no torch): the cohort spec, the phantom, the prompt builders and the
label checks all read this one table, so a finding is defined in exactly one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from factory.errors import CtFactoryError


class VocabError(CtFactoryError, ValueError):
    """A finding name or attribute that the vocabulary does not admit."""


class UniformSource(Protocol):
    """Anything with ``random() -> float in [0, 1)``: ``random.Random`` or a numpy Generator."""

    def random(self) -> float: ...


LOBES: tuple[str, ...] = ("RUL", "RML", "RLL", "LUL", "LLL")
LOBE_NAMES: dict[str, str] = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
LATERALITIES: tuple[str, ...] = ("left", "right", "bilateral")


@dataclass(frozen=True)
class Attribute:
    """One attribute a finding admits: a categorical choice or a numeric range.

    ``weights`` (choices) or ``mode`` (ranges, a triangular distribution over [lo, hi]) give the
    default distribution used when nothing else is asked for.
    """

    name: str
    description: str
    choices: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    lo: float | None = None
    hi: float | None = None
    mode: float | None = None
    unit: str = ""
    integer: bool = False

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    def valid_text(self) -> str:
        """What values are valid, as a person reads it."""
        if self.is_choice:
            return "one of " + ", ".join(self.choices)
        kind = "an integer" if self.integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        return f"{kind} in [{_fmt(self.lo)}, {_fmt(self.hi)}]{unit}"

    def check(self, value: object, where: str) -> str | float | int:
        """Return ``value`` normalised, or raise VocabError naming ``where`` and what is valid."""
        if self.is_choice:
            if isinstance(value, str) and value in self.choices:
                return value
            if isinstance(value, str) and value.lower() in self.choices:
                return value.lower()
            if isinstance(value, str) and value.upper() in self.choices:
                return value.upper()
            raise VocabError(f"{where}: {value!r} is not valid; expected {self.valid_text()}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise VocabError(f"{where}: {value!r} is not a number; expected {self.valid_text()}")
        if self.integer and float(value) != int(value):
            raise VocabError(f"{where}: {value!r} is not an integer; expected {self.valid_text()}")
        assert self.lo is not None and self.hi is not None
        if not self.lo <= value <= self.hi:
            raise VocabError(f"{where}: {value!r} is out of range; expected {self.valid_text()}")
        return int(value) if self.integer else float(value)

    def draw(self, rng: UniformSource) -> str | float | int:
        """Draw a value from the default distribution (one ``rng.random()`` call)."""
        u = float(rng.random())
        if self.is_choice:
            return draw_choice(self.choices, self.weights or (1.0,) * len(self.choices), u)
        assert self.lo is not None and self.hi is not None
        value = triangular(self.lo, self.hi, self.mode if self.mode is not None else self.lo, u)
        return round(value) if self.integer else round(value, 1)


def draw_choice(values: tuple[str, ...], weights: tuple[float, ...], u: float) -> str:
    """Inverse-CDF draw of one of ``values`` with ``weights`` from a uniform ``u``."""
    total = sum(weights)
    acc = 0.0
    for value, weight in zip(values, weights, strict=True):
        acc += weight / total
        if u < acc:
            return value
    return values[-1]


def triangular(lo: float, hi: float, mode: float, u: float) -> float:
    """Inverse CDF of the triangular distribution on [lo, hi] with the given mode."""
    if hi <= lo:
        return lo
    c = (mode - lo) / (hi - lo)
    if u < c:
        return lo + ((hi - lo) * (mode - lo) * u) ** 0.5
    return hi - ((hi - lo) * (hi - mode) * (1.0 - u)) ** 0.5


def _fmt(x: float | None) -> str:
    return "?" if x is None else (f"{x:g}")


def _severity(*levels: str, weights: tuple[float, ...] = (0.5, 0.35, 0.15)) -> Attribute:
    return Attribute("severity", "how marked the finding is", choices=levels, weights=weights)


_LATERALITY = Attribute(
    "laterality", "side of the chest", choices=LATERALITIES, weights=(0.3, 0.3, 0.4)
)
_LOBE = Attribute("lobe", "lung lobe", choices=LOBES, weights=(0.28, 0.1, 0.24, 0.2, 0.18))


@dataclass(frozen=True)
class Finding:
    """One CT-RATE finding with its attributes and the phrases that describe it.

    Phrases are ``str.format`` templates over :func:`phrase_context`; ``section`` places the
    finding in the anatomical order of a CT-RATE report.
    """

    id: str
    column: str
    section: str
    prevalence: float
    attributes: Mapping[str, Attribute]
    present: tuple[str, ...]
    absent: tuple[str, ...]
    impression: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    description: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def _attrs(*attributes: Attribute) -> dict[str, Attribute]:
    return {a.name: a for a in attributes}


# Report sections, in the order a CT-RATE report walks the chest.
SECTIONS: tuple[str, ...] = (
    "airways",
    "mediastinum",
    "heart",
    "lungs",
    "pleura",
    "abdomen",
    "devices",
)

FINDINGS: tuple[Finding, ...] = (
    Finding(
        id="medical_material",
        column="Medical material",
        section="devices",
        prevalence=0.150,
        aliases=("device", "devices", "medical device", "implant"),
        description="a metal-dense device: pacemaker, port catheter, sternotomy wires, tubes",
        attributes=_attrs(
            Attribute(
                "device",
                "which device",
                choices=(
                    "pacemaker",
                    "port_catheter",
                    "sternotomy_wires",
                    "endotracheal_tube",
                    "chest_tube",
                ),
                weights=(0.3, 0.25, 0.25, 0.1, 0.1),
            ),
        ),
        present=(
            "{device_text} is seen.",
            "Postoperative and device changes: {device_text}.",
            "There is {device_lower}.",
        ),
        absent=(),
        impression=("{device_text}.", "Status post {device_lower} placement."),
        extra={
            "pacemaker": "a cardiac pacemaker with its lead in the right heart",
            "port_catheter": "a central venous port catheter ending in the superior vena cava",
            "sternotomy_wires": "median sternotomy wires",
            "endotracheal_tube": "an endotracheal tube in the trachea",
            "chest_tube": "a chest tube in the right pleural space",
        },
    ),
    Finding(
        id="arterial_wall_calcification",
        column="Arterial wall calcification",
        section="mediastinum",
        prevalence=0.276,
        aliases=("aortic calcification", "atherosclerosis", "atherosclerotic calcification"),
        description="calcified plaques in the wall of the aorta",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "{Severity} atherosclerotic calcifications are seen in the wall of the thoracic aorta.",
            "The aortic wall shows {severity} calcified atheromatous plaques.",
            "{Severity} calcification of the arterial walls of the aorta and its branches.",
        ),
        absent=("The thoracic aorta has a normal calibre without wall calcification.",),
        impression=(
            "{Severity} aortic atherosclerosis.",
            "{Severity} arterial wall calcification.",
        ),
    ),
    Finding(
        id="cardiomegaly",
        column="Cardiomegaly",
        section="heart",
        prevalence=0.112,
        aliases=("enlarged heart", "cardiac enlargement"),
        description="a heart wider than half the chest (cardiothoracic ratio above 0.5)",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "The heart is {severity}ly enlarged.",
            "{Severity} cardiomegaly is present.",
            "Heart size is increased ({severity} cardiomegaly).",
        ),
        absent=("Heart size is normal.", "The heart contour and size are normal."),
        impression=("{Severity} cardiomegaly.", "Enlarged heart ({severity})."),
    ),
    Finding(
        id="pericardial_effusion",
        column="Pericardial effusion",
        section="heart",
        prevalence=0.080,
        aliases=("pericardial fluid",),
        description="fluid in the pericardial sac around the heart",
        attributes=_attrs(_severity("small", "moderate", "large", weights=(0.55, 0.3, 0.15))),
        present=(
            "There is a {severity} pericardial effusion.",
            "{Severity} pericardial fluid is noted.",
            "A {severity} amount of fluid is seen in the pericardial space.",
        ),
        absent=("No pericardial effusion.", "There is no pericardial thickening or effusion."),
        impression=("{Severity} pericardial effusion.",),
    ),
    Finding(
        id="coronary_artery_wall_calcification",
        column="Coronary artery wall calcification",
        section="heart",
        prevalence=0.222,
        aliases=("coronary calcification", "coronary artery calcification", "cac"),
        description="calcified plaques along the coronary arteries",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "{Severity} calcifications are present in the coronary arteries.",
            "Coronary artery walls show {severity} calcified plaques.",
            "{Severity} coronary artery wall calcification.",
        ),
        absent=("No coronary artery calcification is seen.",),
        impression=("{Severity} coronary artery calcification.",),
    ),
    Finding(
        id="hiatal_hernia",
        column="Hiatal hernia",
        section="abdomen",
        prevalence=0.160,
        aliases=("hiatus hernia",),
        description="part of the stomach herniated through the oesophageal hiatus",
        attributes=_attrs(
            Attribute("size_mm", "hernia diameter", lo=20, hi=80, mode=35, unit="mm"),
        ),
        present=(
            "A hiatal hernia of about {size} is seen.",
            "There is a sliding hiatal hernia measuring {size}.",
            "Part of the stomach herniates through the hiatus ({size}).",
        ),
        absent=("No hiatal hernia.", "Thoracic oesophageal calibre is normal; no hiatal hernia."),
        impression=("Hiatal hernia.", "Hiatal hernia ({size})."),
    ),
    Finding(
        id="lymphadenopathy",
        column="Lymphadenopathy",
        section="mediastinum",
        prevalence=0.340,
        aliases=("enlarged lymph nodes", "lymph node enlargement", "adenopathy"),
        description="enlarged mediastinal or hilar lymph nodes (short axis above 10 mm)",
        attributes=_attrs(
            Attribute(
                "station",
                "where the largest node is",
                choices=("paratracheal", "subcarinal", "hilar", "prevascular"),
                weights=(0.35, 0.25, 0.25, 0.15),
            ),
            Attribute(
                "size_mm", "short axis of the largest node", lo=10, hi=35, mode=14, unit="mm"
            ),
            Attribute("count", "number of enlarged nodes", lo=1, hi=6, mode=1, integer=True),
        ),
        present=(
            "{Count_nodes} in the {station} region, the largest {size} in short axis.",
            "Mediastinal lymphadenopathy: {count_nodes_lower} at the {station} station "
            "(up to {size}).",
            "There {is_are} {count_nodes_lower} ({station}), measuring up to {size}.",
        ),
        absent=(
            "No mediastinal or hilar lymphadenopathy.",
            "No lymph node of pathological size is seen in the mediastinum.",
        ),
        impression=("Mediastinal lymphadenopathy.", "Enlarged {station} lymph nodes."),
    ),
    Finding(
        id="emphysema",
        column="Emphysema",
        section="lungs",
        prevalence=0.230,
        aliases=("pulmonary emphysema", "copd"),
        description="lung regions of very low attenuation (below -950 HU)",
        attributes=_attrs(
            _severity("mild", "moderate", "severe"),
            Attribute(
                "type",
                "pattern of destruction",
                choices=("centrilobular", "paraseptal"),
                weights=(0.7, 0.3),
            ),
        ),
        present=(
            "{Severity} {type} emphysematous changes are seen in both lungs.",
            "There is {severity} {type} emphysema, predominantly in the upper zones.",
            "Both lungs show {severity} {type} emphysema.",
        ),
        absent=("No emphysema.",),
        impression=("{Severity} {type} emphysema.", "Emphysema ({severity})."),
    ),
    Finding(
        id="atelectasis",
        column="Atelectasis",
        section="lungs",
        prevalence=0.280,
        aliases=("collapse", "subsegmental atelectasis", "volume loss"),
        description="collapsed, airless lung, dependent or plate-like",
        attributes=_attrs(
            _LATERALITY,
            _severity("mild", "moderate", "severe", weights=(0.55, 0.3, 0.15)),
        ),
        present=(
            "{Severity} atelectasis is seen {side_adv} at the lung base.",
            "{Severity} subsegmental atelectatic changes {side_adv} posteriorly.",
            "Dependent atelectasis {side_adv} ({severity}).",
        ),
        absent=("No atelectasis.",),
        impression=("{Severity} atelectasis {side_adv}.", "Atelectasis {side_adv}."),
    ),
    Finding(
        id="lung_nodule",
        column="Lung nodule",
        section="lungs",
        prevalence=0.462,
        aliases=("nodule", "pulmonary nodule", "nodules", "lung nodules"),
        description="a round solid opacity in the lung (3-30 mm)",
        attributes=_attrs(
            Attribute("size_mm", "diameter of the largest nodule", lo=3, hi=30, mode=6, unit="mm"),
            _LOBE,
            Attribute("count", "number of nodules", lo=1, hi=5, mode=1, integer=True),
        ),
        present=(
            "{Count_nodules} in the {lobe_name}, the largest {size}.",
            "There {is_are} {count_nodules_lower} measuring up to {size} in the {lobe_name}.",
            "{Size} solid nodule in the {lobe_name}{more_nodules}.",
        ),
        absent=("No pulmonary nodule.", "No mass or nodule is seen in either lung."),
        impression=("Pulmonary nodule in the {lobe_name} ({size}).", "Lung nodule, {size}."),
    ),
    Finding(
        id="lung_opacity",
        column="Lung opacity",
        section="lungs",
        prevalence=0.300,
        aliases=("ground glass opacity", "ground-glass opacity", "ggo", "opacity"),
        description="hazy ground-glass increase in lung attenuation",
        attributes=_attrs(_LATERALITY, _severity("mild", "moderate", "severe")),
        present=(
            "{Severity} ground-glass opacities are seen {side_adv}.",
            "There are {severity} patchy ground-glass densities {side_adv}.",
            "{Severity} increased parenchymal density (ground glass) {side_adv}.",
        ),
        absent=("No ground-glass opacity.",),
        impression=("Ground-glass opacities {side_adv}.", "{Severity} lung opacity {side_adv}."),
    ),
    Finding(
        id="pulmonary_fibrotic_sequela",
        column="Pulmonary fibrotic sequela",
        section="lungs",
        prevalence=0.266,
        aliases=("fibrotic sequela", "fibrosis", "fibrotic changes", "scarring"),
        description="linear fibrotic bands and scars",
        attributes=_attrs(_LATERALITY),
        present=(
            "Fibrotic sequelae with linear bands are seen {side_adv}.",
            "Linear densities compatible with fibrotic sequelae {side_adv}.",
            "Sequelae of fibrosis (parenchymal bands) {side_adv}.",
        ),
        absent=("No fibrotic change.",),
        impression=("Fibrotic sequelae {side_adv}.",),
    ),
    Finding(
        id="pleural_effusion",
        column="Pleural effusion",
        section="pleura",
        prevalence=0.146,
        aliases=("effusion", "pleural fluid", "hydrothorax"),
        description="fluid layering in the dependent pleural space",
        attributes=_attrs(
            _LATERALITY,
            _severity("small", "moderate", "large", weights=(0.5, 0.33, 0.17)),
        ),
        present=(
            "There is a {severity} pleural effusion {side_adv}.",
            "{Severity} {side} pleural effusion.",
            "A {severity} amount of pleural fluid is seen {side_adv}.",
        ),
        absent=(
            "No pleural effusion.",
            "Pleural spaces are clear.",
            "No pleural effusion or thickening is seen.",
        ),
        impression=("{Severity} {side} pleural effusion.", "Pleural effusion {side_adv}."),
    ),
    Finding(
        id="mosaic_attenuation_pattern",
        column="Mosaic attenuation pattern",
        section="lungs",
        prevalence=0.084,
        aliases=("mosaic attenuation", "mosaic pattern", "air trapping"),
        description="geographic patches of higher and lower lung attenuation",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "A {severity} mosaic attenuation pattern is seen in both lungs.",
            "{Severity} mosaic attenuation of the lung parenchyma.",
        ),
        absent=("Lung parenchymal attenuation is homogeneous.",),
        impression=("Mosaic attenuation pattern.", "{Severity} mosaic attenuation."),
    ),
    Finding(
        id="peribronchial_thickening",
        column="Peribronchial thickening",
        section="airways",
        prevalence=0.089,
        aliases=("bronchial wall thickening", "peribronchial cuffing"),
        description="thickened bronchial walls",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "{Severity} peribronchial thickening is noted.",
            "Bronchial walls are {severity}ly thickened.",
        ),
        absent=("Bronchial walls are of normal thickness.",),
        impression=("Peribronchial thickening.", "{Severity} bronchial wall thickening."),
    ),
    Finding(
        id="consolidation",
        column="Consolidation",
        section="lungs",
        prevalence=0.156,
        aliases=("airspace consolidation", "pneumonia"),
        description="dense airless lung with air bronchograms",
        attributes=_attrs(_LOBE),
        present=(
            "Consolidation with air bronchograms is seen in the {lobe_name}.",
            "There is an area of consolidation in the {lobe_name}.",
            "Consolidated parenchyma in the {lobe_name}.",
        ),
        absent=("No consolidation.", "No pneumonic consolidation is seen."),
        impression=("Consolidation in the {lobe_name}.",),
    ),
    Finding(
        id="bronchiectasis",
        column="Bronchiectasis",
        section="airways",
        prevalence=0.096,
        aliases=("bronchiectases", "dilated bronchi"),
        description="bronchi wider than their accompanying arteries",
        attributes=_attrs(_LATERALITY, _severity("mild", "moderate", "severe")),
        present=(
            "{Severity} cylindrical bronchiectasis is seen {side_adv}, in the lower lobes.",
            "Bronchi are {severity}ly dilated {side_adv} (bronchiectasis).",
        ),
        absent=("No bronchiectasis.",),
        impression=("Bronchiectasis {side_adv}.", "{Severity} bronchiectasis."),
    ),
    Finding(
        id="interlobular_septal_thickening",
        column="Interlobular septal thickening",
        section="lungs",
        prevalence=0.084,
        aliases=("septal thickening", "interstitial thickening"),
        description="a fine net of thickened septa in the lung periphery",
        attributes=_attrs(_severity("mild", "moderate", "severe")),
        present=(
            "{Severity} interlobular septal thickening is seen in the lung periphery.",
            "There is {severity} smooth thickening of the interlobular septa.",
        ),
        absent=("No interlobular septal thickening.",),
        impression=("Interlobular septal thickening.",),
    ),
)

FINDING_IDS: tuple[str, ...] = tuple(f.id for f in FINDINGS)
COLUMNS: tuple[str, ...] = tuple(f.column for f in FINDINGS)
BY_ID: dict[str, Finding] = {f.id: f for f in FINDINGS}

# Reference label statistics: a public hand-labelled set of 800 CT reports (indicative figures).
NO_FINDING_RATE = 0.116
REFERENCE_PHI: dict[tuple[str, str], float] = {
    ("arterial_wall_calcification", "coronary_artery_wall_calcification"): 0.69,
    ("peribronchial_thickening", "bronchiectasis"): 0.35,
    ("arterial_wall_calcification", "cardiomegaly"): 0.31,
    ("pericardial_effusion", "pleural_effusion"): 0.31,
    ("lung_opacity", "consolidation"): 0.30,
    ("atelectasis", "pleural_effusion"): 0.30,
}
# Findings that grow more likely with age (correlation of the latent score with age).
AGE_LOADING: dict[str, float] = {
    "arterial_wall_calcification": 0.55,
    "coronary_artery_wall_calcification": 0.5,
    "cardiomegaly": 0.25,
    "emphysema": 0.2,
    "lung_nodule": 0.1,
}
AGE_RANGE: tuple[int, int] = (18, 102)
# Age of the reference population in years: normal, clipped to AGE_RANGE.
AGE_MEAN, AGE_SD = 56.0, 15.0
MALE_FRACTION = 0.58


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


_NAMES: dict[str, str] = {}
for _f in FINDINGS:
    for _n in (_f.id, _f.column, *_f.aliases):
        _NAMES[_key(_n)] = _f.id


def resolve(name: str) -> str:
    """The snake_case id for a CT-RATE column name, id or alias (case and separators ignored).

    Raises VocabError with a "did you mean" suggestion for unknown names.
    """
    fid = _NAMES.get(_key(str(name)))
    if fid is not None:
        return fid
    close = difflib.get_close_matches(_key(str(name)), list(_NAMES), n=1, cutoff=0.6)
    hint = f"; did you mean {BY_ID[_NAMES[close[0]]].id!r}?" if close else ""
    raise VocabError(
        f"unknown finding {name!r}{hint} Valid: the 18 CT-RATE names or their ids "
        f"({', '.join(FINDING_IDS)})"
    )


def finding(name: str) -> Finding:
    """The Finding for any accepted name."""
    return BY_ID[resolve(name)]


def lobe_side(lobe: str) -> str:
    """'left' or 'right' for a lobe code."""
    return "right" if lobe.startswith("R") else "left"


def validate_attributes(name: str, attrs: Mapping[str, object], where: str = "") -> dict:
    """Check attribute names, values and cross-rules for a finding; return them normalised.

    ``where`` prefixes messages (e.g. a CLI option or a YAML key path).
    """
    f = finding(name)
    prefix = where or f.id
    out: dict[str, object] = {}
    for key, value in attrs.items():
        attribute = f.attributes.get(key)
        if attribute is None:
            valid = ", ".join(f.attributes) or "none"
            raise VocabError(
                f"{prefix}.{key}: {f.column} has no attribute {key!r}; valid attributes: {valid}"
            )
        out[key] = attribute.check(value, f"{prefix}.{key}")
    return out


def complete_attributes(name: str, attrs: Mapping[str, object], rng: UniformSource) -> dict:
    """Validated ``attrs`` with every missing attribute drawn from its default distribution.

    Draws happen in the finding's attribute order, one uniform each, whether or not the value
    is given, so fixing one attribute does not change the draws of the others.
    """
    f = finding(name)
    given = validate_attributes(f.id, attrs)
    out: dict[str, object] = {}
    for key, attribute in f.attributes.items():
        drawn = attribute.draw(rng)
        out[key] = given.get(key, drawn)
    return out


_NUMBER_WORDS = ("no", "a single", "two", "three", "four", "five", "six")


def phrase_context(name: str, attrs: Mapping[str, object]) -> dict[str, str]:
    """Template variables for a finding's phrases, derived from its attributes."""
    f = finding(name)
    ctx: dict[str, str] = {}
    severity = str(attrs.get("severity", ""))
    ctx["severity"], ctx["Severity"] = severity, severity.capitalize()
    side = str(attrs.get("laterality", "bilateral"))
    ctx["side"] = side
    ctx["side_adv"] = {"left": "on the left", "right": "on the right"}.get(side, "bilaterally")
    if "lobe" in attrs:
        ctx["lobe_name"] = LOBE_NAMES[str(attrs["lobe"])]
    if "size_mm" in attrs:
        size = float(attrs["size_mm"])  # type: ignore[arg-type]
        ctx["size"] = f"{size:g} mm"
        article = "An" if ctx["size"].startswith(("8", "11 ", "18 ", "11.", "18.")) else "A"
        ctx["Size"] = f"{article} {ctx['size']}"
    if "type" in attrs:
        ctx["type"] = str(attrs["type"])
    if "station" in attrs:
        ctx["station"] = str(attrs["station"])
    count = int(attrs.get("count", 1))  # type: ignore[call-overload]
    ctx["is_are"] = "is" if count == 1 else "are"
    word = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
    for noun in ("nodule", "node"):
        label = "nodule" if noun == "nodule" else "enlarged lymph node"
        text = f"{word} {label}" + ("" if count == 1 else "s")
        ctx[f"count_{noun}s_lower"] = text
        ctx[f"Count_{noun}s"] = text[0].upper() + text[1:]
    ctx["more_nodules"] = "" if count == 1 else f" and {count - 1} smaller one(s)"
    if "device" in attrs:
        text = f.extra[str(attrs["device"])]
        ctx["device_lower"] = text
        ctx["device_text"] = text[0].upper() + text[1:]
    return ctx


def render_phrase(template: str, name: str, attrs: Mapping[str, object]) -> str:
    """Fill one of a finding's templates from its attributes."""
    return template.format(**phrase_context(name, attrs))
