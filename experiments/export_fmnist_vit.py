"""Export the weights of a `train_fmnist_vit` run into the file that ships as `fmnist_vit`'s weights.

    python experiments/export_fmnist_vit.py outputs/runs/<date>/<time>/checkpoints/best-*.ckpt

Reads the Lightning checkpoint, keeps the timm model's own tensors (the `model.` prefix of the
Lightning module removed), checks that they load into `fmnist_vit` exactly, and writes them as
safetensors. An existing file is kept unless --replace is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import tokenreduce  # noqa: F401  (registers fmnist_vit)
from tokenreduce.models.fmnist import WEIGHTS

PREFIX = "model."


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The timm model's tensors inside a Lightning checkpoint of the engine's ReductionModule."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved)
    tensors = {k[len(PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(PREFIX)}
    model = timm.create_model("fmnist_vit")
    expected = model.state_dict()
    missing, unused = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unused:
        raise SystemExit(f"{checkpoint} does not hold fmnist_vit: missing {missing[:5]}, unused {unused[:5]}")
    model.load_state_dict(tensors, strict=True)
    return {k: tensors[k] for k in expected}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--replace", action="store_true", help="overwrite an existing weights file")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f"checkpoint={args.checkpoint}: no such file")
    if args.out.exists() and not args.replace:
        sys.exit(f"{args.out} exists; pass --replace to overwrite it")
    tensors = model_state(args.checkpoint)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"source": str(args.checkpoint.name)})
    count = sum(t.numel() for t in tensors.values())
    print(f"{args.out}: {len(tensors)} tensors, {count:,} parameters, {args.out.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
