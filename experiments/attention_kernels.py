"""Proportional attention's three kernels side by side: a token-reduced ViT timed with the log-size
bias as a mask, as an extra query/key channel, and through FlexAttention (tokenreduce.core.attention).

    python experiments/attention_kernels.py [--model vit_small_patch16_224] [--r 13] [--batch 1 16]
        [--rounds 7] [--device cpu] [--dtype float32] [--compile]

Prints, per batch size, images/s of each kernel and its ratio to the mask, from the median of
interleaved rounds (every kernel timed once per round), with the largest output difference to
the mask. `--compile` times `torch.compile`d models instead (FlexAttention is meant to be compiled).
"""

from __future__ import annotations

import argparse

import timm
import torch

import tokenreduce
from tokenreduce.core.attention import key_bias_kernel
from tokenreduce.engine.speed import images_per_second, time_forward

KINDS = ("mask", "channel", "flex")


def measure(model_name: str, r: int, batch: int, rounds: int, device: str, dtype: str, compile_: bool) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).to(device=device, dtype=getattr(torch, dtype)).eval()
    tokenreduce.apply(model, "tome", r=r)
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device=device, dtype=getattr(torch, dtype))
    run = torch.compile(model) if compile_ else model
    times, outputs = {k: [] for k in KINDS}, {}
    with torch.inference_mode():
        for kind in KINDS:  # warm up (and compile) each kernel
            with key_bias_kernel(kind):
                outputs[kind] = run(x).float()
                time_forward(run, x, repeats=0, warmup=1)
        for _ in range(rounds):
            for kind in KINDS:
                with key_bias_kernel(kind):
                    times[kind] += time_forward(run, x, repeats=1, warmup=0)
    mask = images_per_second(batch, times["mask"])
    return [{"kernel": k, "batch": batch, "images_per_s": images_per_second(batch, times[k]),
             "vs_mask": images_per_second(batch, times[k]) / mask,
             "max_diff": (outputs[k] - outputs["mask"]).abs().max().item()} for k in KINDS]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    print(f"{args.model} ToMe r={args.r}, {args.dtype} on {args.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds{', compiled' if args.compile else ''}")
    print(f"{'batch':>6}{'kernel':>9}{'img/s':>9}{'vs mask':>9}{'max |diff|':>12}")
    for batch in args.batch:
        for row in measure(args.model, args.r, batch, args.rounds, args.device, args.dtype, args.compile):
            print(f"{row['batch']:>6}{row['kernel']:>9}{row['images_per_s']:>9.2f}{row['vs_mask']:>9.3f}"
                  f"{row['max_diff']:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
