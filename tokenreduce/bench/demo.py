"""`python -m tokenreduce.bench.demo`: ToMe's speed on a ViT-S/16, baseline beside reduced.

Prints tokens per layer, MACs and images/s for r = 8, 13, 16, measured side by side. The weights
are random (no model hub is reachable offline), which changes accuracy but not speed or MACs.
"""

from __future__ import annotations

import argparse

import timm
import torch

import tokenreduce
from tokenreduce.bench.harness import Case, format_rows, images_for, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cases = [Case(f"tome r={r}", "tome", {"r": r}) for r in (8, 13, 16)]
    print(f"{args.model}, random weights, batch {args.batch}, float32, {torch.get_num_threads()} CPU threads\n")
    print("tokens entering each block (class token included), then leaving the last one:")
    for case in cases:
        model = tokenreduce.apply(timm.create_model(args.model).eval(), case.reducer, **case.params)
        with torch.inference_mode():
            model(images_for(1, 224, torch.float32, "cpu"))
        print(f"  {case.label:<10} {tokenreduce.stats(model)['tokens']}")
    print()
    print(format_rows(run(args.model, cases, args.batch, rounds=args.rounds, memory=False)))


if __name__ == "__main__":
    main()
