"""``ctfactory import-model``: a published autoencoder's weights (MAISI's VAE) as a ct-factory
checkpoint holding the VAE alone, on which ``ctfactory train diffusion`` trains with the VAE
frozen. The reading, checking and writing are factory.models.importer's."""

from __future__ import annotations

import argparse

from factory.console import HelpFormatter
from factory.store.cli import add_storage_args, storage_options

EXAMPLES = """\
examples:
  ctfactory import-model models/autoencoder_epoch273.pt --config maisi \\
      --license "NVIDIA OneWay Noncommercial License" --out models/maisi-vae
  ctfactory import-model vae.safetensors --config my-model.yaml --license Apache-2.0 \\
      --out s3://bucket/models/my-vae --storage-option endpoint_url=http://127.0.0.1:9000

FILE is a torch checkpoint (a state dict, or a dict holding it under 'unet_state_dict', as MAISI
publishes it; read with torch.load(weights_only=True), so a pickle holding other objects is
refused, never run) or a safetensors file. A 'module.' prefix (DataParallel) is removed. The
weights must be the VAE that --config builds, key for key and shape for shape; a mismatch names
the missing, unexpected and differently shaped keys. The licence is the weights' publisher's,
stated by you; it goes into the model card with the file's name and sha256.
Then: `ctfactory train diffusion` with diffusion.vae set to --out (docs/training.md).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-model",
        help="import a published VAE's weights (MAISI's) as a ct-factory checkpoint",
        description="Read a third-party autoencoder checkpoint safely, check it against a model "
        "config's VAE, and write it as a ct-factory checkpoint holding the VAE alone.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the weights: .pt / .pth / .ckpt or .safetensors")
    p.add_argument(
        "--config",
        required=True,
        help="the model config the weights belong to: a preset (maisi, tiny, base) or a YAML",
    )
    p.add_argument("--out", required=True, help="the checkpoint to write: a directory or a URL")
    p.add_argument(
        "--license", required=True, help="the weights' licence, as their publisher states it"
    )
    p.add_argument("--name", help="the model's name in its card (default: the --out name)")
    add_storage_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from factory.models.checkpoint import check_destination, upload_checkpoint
    from factory.models.config import load_config
    from factory.models.importer import import_vae
    from factory.refs import is_local

    config = load_config(args.config)
    options = storage_options(args)
    with tempfile.TemporaryDirectory(prefix="ctfactory-import-") as scratch:
        local = is_local(args.out)
        target = Path(args.out) if local else Path(scratch) / "model"
        if local:
            check_destination(target)
        name = args.name or Path(args.out.rstrip("/")).name
        digest, source = import_vae(args.file, config, target, args.license, name=name)
        if not local:
            upload_checkpoint(target, args.out, options)
    print(
        f"imported {source.path.name} (sha256 {source.sha256[:12]}, {source.form}"
        f"{', prefix ' + repr(source.prefix) + ' removed' if source.prefix else ''}) as the "
        f"{config.vae.arch} VAE of config {config.name!r}: {args.out} (content hash "
        f"{digest[:12]}); train on it with diffusion.vae: {args.out}"
    )
    return 0
