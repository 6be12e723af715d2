"""The text encoder: the shipped MiniLM offline, padding, truncation, and a scratch tower."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from factory import vocab
from factory.cohort import prompts
from factory.models.config import TextConfig
from factory.models.text import PromptTruncated, TextEncoder, train_tokenizer

SHORT = "Small right pleural effusion."
LONG = "Findings: the heart is enlarged. Bilateral pleural effusion. Impression: cardiomegaly."


def _no_network(*args, **kwargs):
    raise AssertionError("the text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The builtin MiniLM, loaded with the hub offline and every socket connection refused."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        return TextEncoder.from_config(TextConfig(encoder="builtin:minilm", max_tokens=24))


def test_minilm_loads_offline_and_embeds(minilm: TextEncoder):
    assert minilm.hidden_size == 384
    assert not minilm.training
    tokens, mask = minilm.encode([SHORT, LONG])
    assert tokens.shape[0] == 2 and tokens.shape[2] == 384
    assert mask.dtype == torch.bool and mask.shape == tokens.shape[:2]
    assert mask[0].sum() < mask[1].sum() == tokens.shape[1]  # padded to the longest
    assert torch.isfinite(tokens).all()


def test_padding_leaves_real_tokens_unchanged(minilm: TextEncoder):
    alone, alone_mask = minilm.encode([SHORT])
    batch, batch_mask = minilm.encode([LONG, SHORT])
    n = int(alone_mask.sum())
    assert int(batch_mask[1].sum()) == n and batch.shape[1] > n
    torch.testing.assert_close(batch[1, :n], alone[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        minilm.pooled(batch, batch_mask)[1], minilm.pooled(alone, alone_mask)[0], atol=1e-5, rtol=0
    )


def test_fixed_padding_makes_embeddings_independent_of_the_batch(minilm: TextEncoder):
    alone, alone_mask = minilm.encode([SHORT], pad_to_max=True)
    batch, batch_mask = minilm.encode([LONG, SHORT, LONG, SHORT], pad_to_max=True)
    assert batch.shape[1] == minilm.max_tokens
    # Equal up to GEMM rounding, which differs with the batch shape on some CPUs (2e-6 here).
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(batch_mask[3], alone_mask[0])


def test_long_prompt_warns_once_and_truncates(minilm: TextEncoder):
    long = " ".join(["lung"] * 40)  # 40 tokens + [CLS] [SEP]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = minilm.tokenize([long, SHORT, long])
    assert [w.category for w in caught] == [PromptTruncated]
    assert "2 of 3 prompts" in str(caught[0].message)
    assert "36 tokens" in str(caught[0].message)  # (42 - 24) dropped from each
    assert batch["input_ids"].shape == (3, 24)
    assert batch["input_ids"][0, -1] == minilm.tokenizer.sep_token_id  # cut, still closed


def test_model_limit_caps_max_tokens():
    encoder = TextEncoder.from_config(TextConfig(max_tokens=4096))
    assert encoder.max_tokens == 512  # MiniLM's position embeddings
    with pytest.warns(PromptTruncated):
        tokens, _ = encoder.encode([" ".join(["lung"] * 600)])
    assert tokens.shape[1] == 512


def test_hidden_size_mismatch_names_the_field():
    with pytest.raises(ValueError, match=r"text\.hidden_size.*256.*384"):
        TextEncoder.from_config(TextConfig(hidden_size=256))


def test_unknown_encoder_fails_without_downloading(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    with pytest.raises(ValueError, match=r"text\.encoder.*nothing is downloaded"):
        TextEncoder.from_config(TextConfig(encoder="no-such-org/no-such-encoder"))


def frozen_encoder_has_no_grads(encoder: TextEncoder) -> None:
    tokens, _ = encoder.frozen().encode([SHORT])
    assert not tokens.requires_grad
    assert not any(p.requires_grad for p in encoder.parameters())


def test_frozen(minilm: TextEncoder):
    frozen_encoder_has_no_grads(minilm)


# --- scratch tower ---------------------------------------------------------------------------


def reports(n: int, seed: int = 0) -> list[str]:
    """``n`` findings texts with random labels and attributes."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        labels = {fid: int(rng.random() < 0.2) for fid in vocab.FINDING_IDS}
        attrs = {fid: vocab.complete_attributes(fid, {}, rng) for fid, v in labels.items() if v}
        texts.append(prompts.findings_text(labels, attrs, rng))
    return texts


SCRATCH = TextConfig(
    encoder="scratch", vocab_size=300, hidden_size=32, layers=2, heads=4, max_tokens=512
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(reports(50), 300, tmp_path_factory.mktemp("tokenizer"))


def test_trained_tokenizer_loads_as_bert_style(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert 100 < len(tok) <= 300
    ids = tok("Bilateral PLEURAL effusion.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "bilateral pleural effusion."
    assert tok.pad_token == "[PAD]" and tok.mask_token == "[MASK]"


def test_scratch_round_trip(tokenizer_dir: Path, tmp_path: Path):
    encoder = TextEncoder.from_config(SCRATCH, tokenizer_dir)
    assert encoder.hidden_size == 32 and not encoder.training
    texts = reports(3, seed=1)
    tokens, mask = encoder.encode(texts)
    assert tokens.shape[2] == 32 and mask.all(dim=1).any()
    fresh, _ = TextEncoder.from_config(SCRATCH, tokenizer_dir).encode(texts)
    assert not torch.allclose(fresh, tokens)  # new weights each build until saved

    encoder.save_scratch(tmp_path / "tower")
    again, again_mask = TextEncoder.from_config(SCRATCH, tmp_path / "tower").encode(texts)
    assert torch.equal(again, tokens) and torch.equal(again_mask, mask)
    # The saved tower is also an ordinary Hugging Face directory.
    as_hf = SCRATCH.model_copy(update={"encoder": str(tmp_path / "tower")})
    assert torch.equal(TextEncoder.from_config(as_hf).encode(texts)[0], tokens)
    frozen_encoder_has_no_grads(encoder)


def test_scratch_needs_a_tokenizer_directory():
    with pytest.raises(ValueError, match=r"text\.encoder.*scratch.*train_tokenizer"):
        TextEncoder.from_config(SCRATCH)


def test_scratch_heads_must_divide_width(tokenizer_dir: Path):
    bad = SCRATCH.model_copy(update={"heads": 5})
    with pytest.raises(ValueError, match=r"text\.heads"):
        TextEncoder.from_config(bad, tokenizer_dir)


def test_scratch_weights_of_another_size_fail(tokenizer_dir: Path, tmp_path: Path):
    TextEncoder.from_config(SCRATCH, tokenizer_dir).save_scratch(tmp_path)
    wider = SCRATCH.model_copy(update={"hidden_size": 64})
    with pytest.raises(ValueError, match=r"does not fit text\.hidden_size"):
        TextEncoder.from_config(wider, tmp_path)
