"""3D CLIP across workers: embeddings are gathered, so 2 workers at micro-batch 4 learn exactly as
1 worker at 8 (the same loss and gradients, within float tolerance): two real processes on
torch.distributed's gloo backend, with DDP as Ray Train wraps the model."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from factory.models.clip import CLIP3D
from factory.models.config import load_config
from factory.models.text import TextEncoder
from tests.train_helpers import SMALL_MODEL
from train.clip import CLIPStep

# Texts 1 and 5 are equal: positives of each other across the two workers' halves.
TEXTS = ["effusion", "normal", "nodule", "emphysema", "cardiomegaly", "normal", "opacity", "hernia"]


def step() -> CLIPStep:
    torch.manual_seed(0)
    config = load_config(SMALL_MODEL)
    return CLIPStep(CLIP3D.from_config(config, TextEncoder.from_config(config.text).frozen()))


def volumes() -> torch.Tensor:
    return torch.rand((8, 1, 32, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(step())
        half = slice(4 * rank, 4 * rank + 4)
        loss = model(volumes()[half], TEXTS[half])
        loss.backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads(model.module)}, out)
    finally:
        dist.destroy_process_group()


def test_two_workers_at_batch_4_match_one_at_batch_8(tmp_path):
    one = step()
    loss = one(volumes(), TEXTS)
    loss.backward()
    expected = grads(one)

    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    assert torch.allclose(two["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert two["grads"].keys() == expected.keys() and "clip.logit_scale" in expected
    for name, grad in expected.items():
        assert torch.allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-6), name


def test_without_the_gather_two_workers_would_see_fewer_negatives():
    """The yardstick above can fail: contrasting each half alone gives another loss."""
    model = step()
    whole = model(volumes(), TEXTS)
    halves = (model(volumes()[:4], TEXTS[:4]) + model(volumes()[4:], TEXTS[4:])) / 2
    assert not torch.allclose(whole, halves, rtol=1e-3)
