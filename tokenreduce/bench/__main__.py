"""`python -m tokenreduce.bench [--suite NAME ...]`: the benchmark table of `make bench`."""

from __future__ import annotations

import argparse
import json

import torch

from tokenreduce.bench.harness import format_rows, run
from tokenreduce.bench.suites import SUITES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="default: all suites")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="one table per batch size")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--compile", action="store_true",
                        help="time every case and limit under torch.compile (a compilation each, minutes on a CPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    cases = [case for name in (args.suite or sorted(SUITES)) for case in SUITES[name]]
    rows = []
    for batch in args.batch:
        print(f"model={args.model} batch={batch} img={args.img_size} dtype={args.dtype} device={args.device} "
              f"threads={torch.get_num_threads()} rounds={args.rounds}{' compiled' if args.compile else ''} (random weights)")
        rows += (batch_rows := run(args.model, cases, batch, args.img_size, args.dtype, args.device, args.rounds,
                                   memory=not args.no_memory, compile=args.compile))
        print(format_rows(batch_rows) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
