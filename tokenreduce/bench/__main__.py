"""`python -m tokenreduce.bench [--suite NAME ...]`: the benchmark table of `make bench`.

Without --suite every ViT suite runs (on --model). `--suite diffusion` is the diffusion reducers on
Stable Diffusion 1.5's U-Net (tokenreduce/bench/diffusion.py): it runs only when named, as at its
real size (860 M parameters, 11 cases, a fresh process each for memory) it is slow on a CPU and
needs several GB of memory; named beside ViT suites, both run, the ViT tables first. Its options:
--unet, --latents, --rounds, --dtype, --device, --no-memory, --json (--model, --batch, --img-size
and --compile are the ViT suites' own).
"""

from __future__ import annotations

import argparse
import json

import torch

from tokenreduce.bench import diffusion
from tokenreduce.bench.harness import format_rows, run
from tokenreduce.bench.suites import SUITES
from tokenreduce.errors import ConfigError

DIFFUSION = "diffusion"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=sorted(SUITES) + [DIFFUSION],
                        help=f"repeatable; default: every ViT suite ({DIFFUSION!r} only when named)")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="one table per batch size")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help=f"{DIFFUSION} on a CPU: float32 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--compile", action="store_true",
                        help="time every case and limit under torch.compile (a compilation each, minutes on a CPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--unet", default="sd15", choices=sorted(diffusion.UNETS),
                        help=f"{DIFFUSION}: SD 1.5's U-Net, or a tiny one of the same layout (tests)")
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 96],
                        help=f"{DIFFUSION}: latent sizes, one table each (64: 512x512 images, 96: 768x768)")
    args = parser.parse_args(argv)
    suites = args.suite or sorted(SUITES)
    if DIFFUSION in suites:
        try:
            diffusion.check_settings(args.unet, args.latents, args.dtype, args.device, args.rounds)
        except ConfigError as err:
            parser.error(str(err))
    cases = [case for name in suites if name != DIFFUSION for case in SUITES[name]]
    rows = []
    for batch in args.batch if cases else []:
        print(f"model={args.model} batch={batch} img={args.img_size} dtype={args.dtype} device={args.device} "
              f"threads={torch.get_num_threads()} rounds={args.rounds}{' compiled' if args.compile else ''} (random weights)")
        rows += (batch_rows := run(args.model, cases, batch, args.img_size, args.dtype, args.device, args.rounds,
                                   memory=not args.no_memory, compile=args.compile))
        print(format_rows(batch_rows) + "\n", flush=True)
    if DIFFUSION in suites:
        for latent in args.latents:
            rows += (latent_rows := diffusion.run(args.unet, latent, args.dtype, args.device, args.rounds,
                                                  memory=not args.no_memory))
            print(diffusion.report(latent_rows) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
