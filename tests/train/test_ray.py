"""Training on a real local Ray cluster: 2 workers per task, exact resume after the driver is
killed, recovery from a killed worker, export and reload, training on an imported MAISI VAE.
Elastic training over several nodes with checkpoints on an S3 API server is in
tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from factory.models.checkpoint import load_checkpoint
from factory.models.config import load_config
from factory.models.generator import Generator, Request
from factory.models.importer import import_vae
from factory.models.vae import build_vae
from factory.pipeline import generate_cohort, prepare_run
from factory.refs import local_path
from factory.store.reader import open_cohort
from tests.conftest import ctfactory_bin
from tests.store_helpers import write_spec
from tests.train_helpers import SMALL_MODEL, config, make_dataset
from train.config import parse_train_config
from train.data import index_rows
from train.export import export_model, latest_checkpoint
from train.launcher import build_dataset, latest_meta, launch, materialize_in_order


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("phantom"), n_train=8, n_valid=2)


def _history(cfg) -> list[dict]:
    return latest_checkpoint(cfg.run_url, cfg.storage_options)["history"]


def _slow_first(row: dict) -> dict:
    if row["item"] < 2:
        time.sleep(1.0)
    return row


def test_a_cached_dataset_keeps_its_input_order(cluster):
    """Cached rows come out in input order although the first block finishes last, so a resumed
    run sees each epoch as the interrupted one did; Ray's own default context is left alone."""
    import ray
    from ray.data import DataContext

    ds = ray.data.from_items(list(range(16)), override_num_blocks=8).map(_slow_first)
    assert [r["item"] for r in materialize_in_order(ds).take_all()] == list(range(16))
    assert not DataContext.get_current().execution_options.preserve_order


def test_training_rows_are_shuffled_across_splits_once_and_seeded(cluster, dataset):
    """Splits arrive one after the other; the workers' local shuffle alone would feed runs of
    batches from one split, so the launcher shuffles the rows across the whole dataset, the
    same way for the same seed (a resumed run sees the same order)."""
    rows = index_rows(dataset, ["train", "valid"], masks=False)
    names = [r["name"] for r in rows]

    def order(seed: int) -> list[str]:
        cfg = parse_train_config(config("vae", dataset, "unused", seed=seed))
        ds, n, _ = build_dataset(cfg, rows, use_gpu=False)
        assert n == len(rows)
        return [str(r["name"]) for r in materialize_in_order(ds).take_all()]

    first = order(0)
    assert sorted(first) == sorted(names) and first != names
    assert order(0) == first and order(1) != first


def test_every_task_on_two_workers_then_export_and_generate(cluster, dataset, tmp_path):
    runs = tmp_path / "runs"
    # The VAE trains against its patch discriminator, under DDP; the export holds the VAE alone.
    adversarial = {"channels": 8, "layers": 2, "start": 2}
    vae_cfg = parse_train_config(
        config(
            "vae",
            dataset,
            runs,
            workers="2",
            vae={"crop": [16, 16, 16], "adversarial": adversarial},
        )
    )
    assert launch(vae_cfg).error is None
    history = _history(vae_cfg)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert {r["world_size"] for r in history} == {2}
    assert "eval/mae_hu" in history[-1]
    export_model(vae_cfg.run_url, tmp_path / "vae-model")

    clip_cfg = parse_train_config(config("clip", dataset, runs, workers="2", steps=2))
    assert launch(clip_cfg).error is None
    assert "eval/text_to_image_r1" in _history(clip_cfg)[-1]
    export_model(clip_cfg.run_url, tmp_path / "clip-model")

    diff_cfg = parse_train_config(
        config(
            "diffusion",
            dataset,
            runs,
            workers="2",
            ema_decay=0.9,
            diffusion={"vae": str(tmp_path / "vae-model"), "clip": str(tmp_path / "clip-model")},
        )
    )
    assert launch(diff_cfg).error is None
    sets = list((dataset / "latents").glob("*/complete.json"))
    assert len(sets) == 1 and json.loads(sets[0].read_text())["rows"] == 8
    assert (runs / "diffusion" / "metrics.jsonl").read_text().count("\n") == 4

    export_model(diff_cfg.run_url, tmp_path / "model", name="test")
    generator = Generator.load(str(tmp_path / "model"), device="cpu")
    scale = generator.config.vae.scale_factor
    assert scale == pytest.approx(1 / json.loads(sets[0].read_text())["std"])
    (volume,) = generator.generate([Request("Pleural effusion.", seed=3, steps=2)])
    assert volume.hu.shape == (32, 32, 32) and volume.hu.dtype == np.int16
    assert set(volume.masks) == {"lungs", "heart"}
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["steps"] == 4 and card["extra"]["sources"]["vae"]["hash"]
    assert (tmp_path / "model" / "clip.safetensors").is_file()
    assert (tmp_path / "model" / "labels.csv").read_text().count("\n") == 9


def test_resume_after_the_driver_dies_matches_an_uninterrupted_run(cluster, dataset, tmp_path):
    settings = {"workers": "2", "steps": 9, "checkpoint_every": 3, "vae": {"crop": [16, 16, 16]}}
    whole = parse_train_config(config("vae", dataset, tmp_path, name="whole", **settings))
    assert launch(whole).error is None

    # The same run as a CLI process on this cluster, killed after its step-3 checkpoint
    # (mid-epoch: 2 steps make an epoch here), then resumed in-process.
    data = config("vae", dataset, tmp_path, name="split", **settings)
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "RAY_ADDRESS": cluster}
    console = (tmp_path / "console.err").open("w")
    proc = subprocess.Popen(
        [*ctfactory_bin(), "train", "vae", "--config", str(tmp_path / "split.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=console,
    )
    split = parse_train_config(data)
    deadline = time.time() + 300
    while time.time() < deadline and not (latest_meta(split) or {}).get("step"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    console.close()
    # Ray's and Ray Train's lines went to the run's log as it ran, not to the console.
    (log,) = (Path(local_path(split.run_url)) / "logs").glob("train-vae-*.log")
    assert "ray" in log.read_text().lower()
    assert "INFO" not in (tmp_path / "console.err").read_text()
    stopped_at = latest_meta(split)["step"]
    assert 3 <= stopped_at < 9
    assert launch(split, resume=True).error is None

    a = latest_checkpoint(whole.run_url)
    b = latest_checkpoint(split.run_url)
    assert b["meta"]["step"] == 9 and b["meta"]["restarts"] >= 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def _kill_a_worker_after_first_checkpoint(cfg, killed: list[int]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and latest_meta(cfg) is None:
        time.sleep(0.2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


def test_a_killed_worker_is_replaced_and_training_restores(cluster, dataset, tmp_path):
    cfg = parse_train_config(
        config(
            "vae",
            dataset,
            tmp_path,
            workers="2",
            steps=8,
            checkpoint_every=2,
            max_failures=2,
            vae={"crop": [16, 16, 16]},
        )
    )
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, killed))
    killer.start()
    result = launch(cfg)
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    assert result.error is None
    final = latest_checkpoint(cfg.run_url)
    assert final["meta"]["step"] == 8 and final["meta"]["restarts"] >= 1
    assert [r["step"] for r in final["history"]] == list(range(1, 9))


def test_an_imported_maisi_vae_trains_a_diffusion_model_that_makes_a_cohort(
    cluster, dataset, tmp_path
):
    # MAISI's architecture at the small grid, random weights, saved as MAISI publishes them
    # (a dict holding them under unet_state_dict) with a DataParallel prefix.
    model = yaml.safe_load(Path(SMALL_MODEL).read_text())
    model["vae"] |= {"arch": "maisi", "num_splits": 2, "norm_float16": True}
    model_yaml = tmp_path / "maisi-small.yaml"
    model_yaml.write_text(yaml.safe_dump(model))
    torch.manual_seed(0)
    weights = build_vae(load_config(model_yaml).vae).state_dict()
    published = tmp_path / "autoencoder.pt"
    torch.save({"unet_state_dict": {f"module.{k}": v for k, v in weights.items()}}, published)
    imported = tmp_path / "maisi-vae"  # the command's own test is tests/models/test_import.py
    import_vae(published, load_config(model_yaml), imported, license="Test-1.0")

    cfg = parse_train_config(
        config(
            "diffusion",
            dataset,
            tmp_path / "runs",
            model=str(model_yaml),
            steps=2,
            diffusion={"vae": str(imported), "latent_cache": str(tmp_path / "latents")},
        )
    )
    assert launch(cfg).error is None
    (complete,) = (tmp_path / "latents").glob("*/complete.json")
    std = json.loads(complete.read_text())["std"]
    export_model(cfg.run_url, tmp_path / "model", name="on-maisi")

    trained = load_checkpoint(tmp_path / "model")
    assert trained.config.vae.arch == "maisi"
    assert trained.config.vae.scale_factor == pytest.approx(1 / std)  # from the data
    for key, value in weights.items():  # the VAE stayed frozen
        assert torch.equal(trained.state_dict("vae")[key], value), key
    sources = json.loads((tmp_path / "model" / "model_card.json").read_text())["extra"]
    assert sources["sources"]["vae"]["hash"] == load_checkpoint(imported).hash

    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "model", n=2, output=str(tmp_path / "c"))
    totals = generate_cohort(prepare_run(str(spec)), workers=1, batch_size=2)
    assert totals.written == 2
    cohort = open_cohort(str(tmp_path / "c"))
    assert cohort.check() == []
    volume = cohort.volume(cohort.manifest.iloc[0]["volume_id"])
    assert volume.hu.shape == (32, 32, 32) and set(volume.masks) == {"lungs", "heart"}
