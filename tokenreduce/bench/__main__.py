"""`python -m tokenreduce.bench [--suite NAME ...]`: the benchmark table of `make bench`.

Without --suite every ViT suite runs (on --model). `--suite diffusion` is the diffusion reducers on
Stable Diffusion 1.5's U-Net (tokenreduce/bench/diffusion.py): it runs only when named, as at its
real size (860 M parameters, 11 cases, a fresh process each for memory) it is slow on a CPU and
needs several GB of memory; named beside ViT suites, both run, the ViT tables first. Its options:
--unet, --latents, --rounds, --dtype, --device, --no-memory, --json (--model, --batch, --img-size
and --compile are the ViT suites' own). `--suite vlm` is the vision-language reducers' prefill and
decoding speed on LLaVA-1.5-7B's architecture with fewer decoder layers (tokenreduce/bench/vlm.py):
it too runs only when named (several GB of memory, minutes of CPU). Its options: --model (llava15,
or tiny: the same layout, small, for tests), --lm-layers, --tokens, --new-tokens, --batch, --rounds,
--dtype, --device, --no-memory, --json; --model names one model, so it is not given with ViT suites.
"""

from __future__ import annotations

import argparse
import json

import torch

from tokenreduce.bench import diffusion, vlm
from tokenreduce.bench.harness import format_rows, run
from tokenreduce.bench.suites import SUITES
from tokenreduce.errors import ConfigError

DIFFUSION = "diffusion"
VLM = "vlm"
ONLY_WHEN_NAMED = (DIFFUSION, VLM)
VIT_MODEL, VIT_BATCHES, ROUNDS = "vit_small_patch16_224", [1, 16], 5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=sorted(SUITES) + list(ONLY_WHEN_NAMED),
                        help=f"repeatable; default: every ViT suite ({DIFFUSION!r} and {VLM!r} only when named)")
    parser.add_argument("--model", help=f"the ViT suites' timm model (default {VIT_MODEL}); {VLM}: "
                        f"{', '.join(vlm.MODELS)} (default {vlm.LLAVA15})")
    parser.add_argument("--batch", type=int, nargs="+",
                        help=f"one table per batch size (default: {' '.join(map(str, VIT_BATCHES))}; {VLM}: 1)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help=f"{DIFFUSION} and {VLM} on a CPU: float32 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, help=f"timing rounds (default {ROUNDS}; {VLM}: {vlm.ROUNDS})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--compile", action="store_true",
                        help="time every case and limit under torch.compile (a compilation each, minutes on a CPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--unet", default="sd15", choices=sorted(diffusion.UNETS),
                        help=f"{DIFFUSION}: SD 1.5's U-Net, or a tiny one of the same layout (tests)")
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 96],
                        help=f"{DIFFUSION}: latent sizes, one table each (64: 512x512 images, 96: 768x768)")
    parser.add_argument("--lm-layers", type=int, default=vlm.LM_LAYERS,
                        help=f"{VLM}: the language model's decoder layers (LLaVA-1.5-7B has {vlm.FULL_DEPTH}); the "
                        "reducers' stage layers are scaled to them")
    parser.add_argument("--tokens", type=int, nargs="+",
                        help=f"{VLM}: visual tokens kept per image, one case per method each (default "
                        f"{' '.join(map(str, vlm.PAPER_TOKENS))} of {vlm.PAPER_PATCHES}, scaled to the patches of "
                        "--model tiny)")
    parser.add_argument("--new-tokens", type=int, default=vlm.NEW_TOKENS,
                        help=f"{VLM}: greedy tokens decoded after the prefill, timed per token")
    args = parser.parse_args(argv)
    suites = args.suite or sorted(SUITES)
    vit_suites = [name for name in suites if name not in ONLY_WHEN_NAMED]
    rounds = ROUNDS if args.rounds is None else args.rounds
    vlm_model, vlm_batches = args.model or vlm.LLAVA15, args.batch or [1]
    vlm_rounds = vlm.ROUNDS if args.rounds is None else args.rounds
    try:
        if DIFFUSION in suites:
            diffusion.check_settings(args.unet, args.latents, args.dtype, args.device, rounds)
        if VLM in suites:
            if vit_suites and args.model is not None:
                raise ConfigError(f"--model={args.model!r} with --suite {VLM} and ViT suites ({', '.join(vit_suites)}) "
                                  f"is ambiguous; allowed: --model with the {VLM} suite without ViT suites, or the "
                                  "ViT suites without it")
            for batch in vlm_batches:
                vlm.check_settings(vlm_model, args.lm_layers, args.tokens, batch, args.new_tokens, args.dtype,
                                   args.device, vlm_rounds)
    except ConfigError as err:
        parser.error(str(err))
    cases = [case for name in vit_suites for case in SUITES[name]]
    model = args.model or VIT_MODEL
    rows = []
    for batch in (args.batch or VIT_BATCHES) if cases else []:
        print(f"model={model} batch={batch} img={args.img_size} dtype={args.dtype} device={args.device} "
              f"threads={torch.get_num_threads()} rounds={rounds}{' compiled' if args.compile else ''} (random weights)")
        rows += (batch_rows := run(model, cases, batch, args.img_size, args.dtype, args.device, rounds,
                                   memory=not args.no_memory, compile=args.compile))
        print(format_rows(batch_rows) + "\n", flush=True)
    if DIFFUSION in suites:
        for latent in args.latents:
            rows += (latent_rows := diffusion.run(args.unet, latent, args.dtype, args.device, rounds,
                                                  memory=not args.no_memory))
            print(diffusion.report(latent_rows) + "\n", flush=True)
    if VLM in suites:
        for batch in vlm_batches:
            rows += (vlm_rows := vlm.run(vlm_model, args.lm_layers, args.tokens, batch, args.dtype, args.device,
                                         vlm_rounds, args.new_tokens, memory=not args.no_memory))
            print(vlm.report(vlm_rows) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
