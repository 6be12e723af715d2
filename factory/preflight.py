"""What a spec's references can be checked for before any work, cheaply and without torch: the
model and the classifier (a builtin name, a local directory's files, config and safetensors
headers, the sampler against the model's objective) and the output's store. ``ctfactory plan``
and ``generate`` both call it, so that what plan passes, generate does not refuse later."""

from __future__ import annotations

from dataclasses import dataclass

from factory.cohort.errors import Path
from factory.cohort.spec_schema import CohortSpec
from factory.errors import UsageError
from factory.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from factory.models.sampling import SamplerError, sampling_settings
from factory.refs import parse_ref
from factory.store.cohort import check_output_url
from factory.store.fs import StoreError


@dataclass(frozen=True)
class References:
    """What :func:`check_references` read: the model and the classifier (None where remote,
    not read here), the sampler settings the model runs with (None with a remote model), and
    one line per reference saying what was checked."""

    lines: list[str]
    model: Checkpoint | None
    sampler: dict | None
    classifier: Checkpoint | None


def check_references(
    spec: CohortSpec, out: str | None = None, hash_files: bool = False
) -> References:
    """Check the spec's model, classifier and output (``out`` replacing ``spec.output``);
    raises SpecError at the key (UsageError for ``--out``). ``hash_files``: also check every
    file's sha256, as a run that then uses the checkpoints does."""
    lines = []
    checkpoint = _checked(spec, ("model",), spec.model, hash_files)
    sampler = None
    if checkpoint is None:
        lines.append(_unchecked("model", spec.model))
    else:
        try:
            sampler = sampling_settings(checkpoint.config.diffusion, **spec.sampler.model_dump())
        except SamplerError as exc:
            text = str(exc)
            key = next((k for k in ("steps", "guidance") if text.startswith(k)), "scheduler")
            raise spec.error(("sampler", key), f"{exc} (the model {spec.model})") from None
        lines.append(
            f"model {spec.model}: files, config and weights headers checked; samples with "
            f"{sampler['scheduler']}, {sampler['steps']} steps, guidance {sampler['guidance']:g}"
        )
    classifier = None
    if spec.verify is not None:
        ref = spec.verify.classifier
        classifier = _checked(spec, ("verify", "classifier"), ref, hash_files)
        if classifier is None:
            lines.append(_unchecked("verify.classifier", ref))
        else:
            lines.append(f"verify.classifier {ref}: files, config and weights headers checked")
    try:
        check_output_url(out or spec.output)
    except StoreError as exc:
        if out is not None:
            raise UsageError(f"--out {exc}") from None
        raise spec.error(("output",), str(exc)) from None
    return References(lines, checkpoint, sampler, classifier)


def _checked(spec: CohortSpec, path: Path, ref: str, hash_files: bool) -> Checkpoint | None:
    """The checkpoint at ``ref`` as its loader checks it (file set, config, card, weights'
    headers, and the hashes with ``hash_files``), or None for a remote one; a SpecError at
    ``path`` else."""
    if parse_ref(ref).kind == "remote":
        return None
    try:
        return load_checkpoint(ref, hash_files=hash_files)
    except CheckpointError as exc:
        raise spec.error(path, str(exc)) from None


def _unchecked(key: str, ref: str) -> str:
    return (
        f"{key} {ref}: not checked here (a remote model: generate downloads it and checks its "
        "files, hashes and sampler before any volume)"
    )
