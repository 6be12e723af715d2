"""Latents for diffusion training, encoded once by the frozen VAE in a Ray Data job and stored
at a URL every node reaches (the dataset's folder by default, or ``diffusion.latent_cache``:
say an ``s3://`` prefix), named by the VAE's content hash.

Layout: ``{cache}/{splits}-{vae_hash[:16]}/data-{nonce}/*.parquet`` (one row per volume: the
latent (C, x, y, z) with anatomy channels appended when the model has them, text, labels) and
``complete.json`` (hash, rows, image-latent mean and std, scale factor, which ``data-*``
folder), written last: a set without it is incomplete and is encoded again. Nothing is renamed,
so the same protocol holds on object storage. Latents are stored unscaled; the scale factor
(1 / std, as latent diffusion does) is applied by training and recorded in the model.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from factory.models.checkpoint import CheckpointError, load_checkpoint
from factory.models.config import ModelConfig, VAEConfig
from factory.models.generator import default_device
from factory.models.intensity import mask_to_latent
from factory.models.vae import LatentCodec, build_vae
from factory.refs import ref_options
from factory.store.fs import arrow_fs, open_fs, write_url
from train.data import TEXT_COLUMNS, load_row

COMPLETE = "complete.json"


@dataclass(frozen=True)
class LatentSet:
    """A finished latent set: where it and its Parquet files are, and what made them."""

    url: str
    data: str
    vae_hash: str
    rows: int
    mean: float
    std: float

    @property
    def scale_factor(self) -> float:
        return 1.0 / self.std


def vae_codec(
    vae_ref: str, model: ModelConfig, storage_options: dict | None = None
) -> tuple[LatentCodec, str]:
    """The VAE of a checkpoint as a codec that returns unscaled latents, and its hash; refuses a
    VAE whose architecture differs from ``model``'s."""
    checkpoint = load_checkpoint(vae_ref, storage_options=ref_options(vae_ref, storage_options))
    ours = model.vae.model_copy(update={"scale_factor": 1.0, "decode_slab": 0})
    theirs, needed = (architecture(v) for v in (checkpoint.config.vae, ours))
    if theirs != needed or checkpoint.config.size != model.size:
        raise CheckpointError(
            f"diffusion.vae: {vae_ref} was made for another model (vae {theirs}, size "
            f"{checkpoint.config.size}); this model needs vae {needed}, size {model.size}: "
            "give the model config the VAE's settings"
        )
    vae = build_vae(ours)
    vae.load_state_dict(checkpoint.state_dict("vae"))
    return LatentCodec(vae, ours).eval(), checkpoint.hash


def architecture(vae: VAEConfig) -> dict:
    """What a VAE is, less its latent scale and how it is run (VAEConfig.RUNTIME)."""
    return vae.model_dump(exclude={"scale_factor", *VAEConfig.RUNTIME})


class LatentEncoder:
    """Ray Data callable: a batch of index rows -> rows with ``latent`` and its statistics."""

    def __init__(
        self, vae_ref: str, model: str, model_config: dict, storage_options: dict | None = None
    ):
        self.model = model
        self.config = ModelConfig.model_validate(model_config)
        self.device = default_device()
        self.codec, _ = vae_codec(vae_ref, self.config, storage_options)
        self.codec.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["name"])
        rows = [load_row({k: v[i] for k, v in batch.items()}, self.model) for i in range(n)]
        image = torch.as_tensor(np.stack([r["image"] for r in rows])).to(self.device)
        latent = self.codec.encode(image).float()
        stats = latent.flatten(1)
        channels = self.config.diffusion.anatomy_channels
        if channels:
            masks = torch.as_tensor(np.stack([r["anatomy"] for r in rows])).to(self.device)
            latent = torch.cat([latent, mask_to_latent(masks, self.config.vae.factor)], dim=1)
        out = {k: np.asarray([r[k] for r in rows]) for k in TEXT_COLUMNS}
        out["labels"] = np.stack([r["labels"] for r in rows])
        out["latent"] = latent.cpu().numpy().astype(np.float32)
        out["sum"] = stats.sum(1).double().cpu().numpy()
        out["sumsq"] = stats.pow(2).sum(1).double().cpu().numpy()
        out["count"] = np.full(n, stats.shape[1], dtype=np.int64)
        return out


def latent_url(cache: str, splits: Sequence[str], vae_hash: str) -> str:
    return f"{cache.rstrip('/')}/{'+'.join(splits)}-{vae_hash[:16]}"


def existing(url: str, vae_hash: str, storage_options: dict) -> LatentSet | None:
    """The complete set at ``url`` made by this VAE, if there is one."""
    fs, path = open_fs(url, storage_options)
    try:
        info = json.loads(fs.cat_file(f"{path}/{COMPLETE}"))
    except (FileNotFoundError, ValueError):
        return None
    if info.get("vae_hash") != vae_hash or "data" not in info:
        return None
    data = f"{url}/{info['data']}"
    return LatentSet(url, data, vae_hash, info["rows"], info["mean"], info["std"])


def finish(url: str, data: str, vae_hash: str, sums: dict[str, float], options: dict) -> LatentSet:
    """Record the statistics of a fully written ``data`` folder: the set's commitment."""
    count = sums["count"]
    mean = sums["sum"] / count
    std = float(np.sqrt(max(sums["sumsq"] / count - mean**2, 1e-12)))
    info = {"vae_hash": vae_hash, "rows": int(sums["rows"]), "mean": mean, "std": std}
    info |= {"scale_factor": 1.0 / std, "data": data}
    write_url(f"{url}/{COMPLETE}", (json.dumps(info, indent=2) + "\n").encode(), options)
    return LatentSet(url, f"{url}/{data}", vae_hash, info["rows"], mean, std)


def encode_local(rows: list[dict], vae_ref: str, model: str, config: ModelConfig) -> list[dict]:
    """The same encoding in this process (tests, small sets): one latent row per index row."""
    from train.session import collate

    encoder = LatentEncoder(vae_ref, model, config.model_dump(mode="json"))
    out = []
    for start in range(0, len(rows), 4):
        batch = encoder(collate(rows[start : start + 4]))
        out += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["name"]))]
    return out


def precompute(
    rows: list[dict],
    cache: str,
    splits: Sequence[str],
    vae_ref: str,
    model: str,
    config: ModelConfig,
    workers: int = 1,
    use_gpu: bool = False,
    storage_options: dict | None = None,
) -> LatentSet:
    """Encode ``rows`` with a pool of VAE actors into the set under ``cache`` (a path or URL),
    unless a complete set for this VAE exists there."""
    import pyarrow.parquet as pq
    import ray
    from ray.data import ActorPoolStrategy

    options = dict(storage_options or {})
    _, vae_hash = vae_codec(vae_ref, config, options)
    url = latent_url(cache, splits, vae_hash)
    found = existing(url, vae_hash, options)
    if found is not None and found.rows == len(rows):
        print(f"latents: reusing {url} ({found.rows} volumes, VAE {vae_hash[:12]})", flush=True)
        return found
    print(f"latents: encoding {len(rows)} volumes with VAE {vae_hash[:12]} -> {url}", flush=True)
    data = f"data-{uuid.uuid4().hex[:8]}"
    filesystem, path = arrow_fs(f"{url}/{data}", options)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 4, 64)))
    ds = ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "vae_ref": vae_ref,
            "model": model,
            "model_config": config.model_dump(mode="json"),
            "storage_options": options,
        },
        batch_size=4,
        compute=ActorPoolStrategy(size=workers),
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
    )
    try:
        ds.write_parquet(path, filesystem=filesystem)
        table = pq.read_table(path, columns=["sum", "sumsq", "count"], filesystem=filesystem)
        sums = {k: float(np.sum(table[k].to_numpy())) for k in ("sum", "sumsq", "count")}
        sums["rows"] = table.num_rows
        if table.num_rows != len(rows):
            raise RuntimeError(f"latents: wrote {table.num_rows} rows for {len(rows)} volumes")
    except BaseException:  # an unfinished attempt leaves nothing (a killed one, its folder)
        fs, folder = open_fs(f"{url}/{data}", options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(folder, recursive=True)
        raise
    return finish(url, data, vae_hash, sums, options)
