"""The finding vocabulary: CT-RATE names and order, attributes, phrasings."""

from __future__ import annotations

import random

import pytest

from factory import vocab

CT_RATE_COLUMNS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]  # fmt: skip


def test_eighteen_ct_rate_columns_in_order():
    assert list(vocab.COLUMNS) == CT_RATE_COLUMNS
    assert len(set(vocab.FINDING_IDS)) == 18
    assert all(fid == fid.lower() and " " not in fid for fid in vocab.FINDING_IDS)


@pytest.mark.parametrize(
    ("name", "fid"),
    [("Pleural effusion", "pleural_effusion"), ("pleural_effusion", "pleural_effusion"),
     ("PLEURAL-EFFUSION", "pleural_effusion"), ("ggo", "lung_opacity"), ("nodule", "lung_nodule"),
     ("Coronary artery wall calcification", "coronary_artery_wall_calcification")],
)  # fmt: skip
def test_resolve_accepts_columns_ids_and_aliases(name, fid):
    assert vocab.resolve(name) == fid


def test_unknown_name_suggests_the_closest():
    with pytest.raises(vocab.VocabError, match="did you mean 'cardiomegaly'"):
        vocab.resolve("cardiomegally")
    with pytest.raises(vocab.VocabError, match="unknown finding 'xyz'"):
        vocab.resolve("xyz")


def test_attribute_rules():
    assert vocab.validate_attributes("lung nodule", {"size_mm": 8, "lobe": "rul"}) == {
        "size_mm": 8.0,
        "lobe": "RUL",
    }
    with pytest.raises(vocab.VocabError, match=r"size_mm.*out of range.*\[3, 30\] mm"):
        vocab.validate_attributes("lung_nodule", {"size_mm": -1})
    with pytest.raises(vocab.VocabError, match="Cardiomegaly has no attribute 'laterality'"):
        vocab.validate_attributes("cardiomegaly", {"laterality": "left"})
    with pytest.raises(vocab.VocabError, match="not an integer"):
        vocab.validate_attributes("lung_nodule", {"count": 1.5})
    with pytest.raises(vocab.VocabError, match="one of pacemaker"):
        vocab.validate_attributes("medical_material", {"device": "stent"})


def test_every_finding_has_phrasings_that_render_for_any_attributes():
    rng = random.Random(0)
    for f in vocab.FINDINGS:
        assert len(f.present) >= 2 or f.id == "interlobular_septal_thickening"
        assert f.impression
        for _ in range(20):
            attrs = vocab.complete_attributes(f.id, {}, rng)
            assert set(attrs) == set(f.attributes)
            for template in (*f.present, *f.impression):
                text = vocab.render_phrase(template, f.id, attrs)
                assert "{" not in text and "None" not in text


def test_complete_attributes_keeps_given_values_and_other_draws():
    a = vocab.complete_attributes("lung_nodule", {}, random.Random(1))
    b = vocab.complete_attributes("lung_nodule", {"lobe": "LLL"}, random.Random(1))
    assert b["lobe"] == "LLL" and b["size_mm"] == a["size_mm"] and b["count"] == a["count"]


def test_reference_statistics_are_consistent():
    assert all(0 < f.prevalence < 1 for f in vocab.FINDINGS)
    for a, b in vocab.REFERENCE_PHI:
        assert a in vocab.BY_ID and b in vocab.BY_ID
    assert set(vocab.AGE_LOADING) <= set(vocab.FINDING_IDS)
