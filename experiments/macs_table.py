"""Reproduce the GMACs columns of the published tables from the realised token counts.

MACs do not depend on the weights, so this runs offline with random weights: one 224x224 image
through each model with each method at its published setting, counted by `tokenreduce.stats`.
The published figures are those the papers report as "GFLOPs" (multiply-accumulates).

    python experiments/macs_table.py
"""

from __future__ import annotations

import timm
import torch

import tokenreduce
from tokenreduce.reducers.mctf import MCTF_FAST

STAGES = {"ratio": 0.7, "layers": [3, 6, 9]}
# (model, label, reducer, parameters, published GMACs or None). The one record of the published
# figures: each docs/reducers/<reducer>.md page quotes its own (tests/test_experiments.py checks
# they agree). Kept as printed, since the papers print one or two decimals.
ROWS = [
    ("deit_tiny_patch16_224", "baseline", "none", {}, "1.26"),
    ("deit_tiny_patch16_224", "MCTF r=16", "mctf", {"r": 16}, "0.71"),
    ("deit_tiny_patch16_224", "MCTF-Fast", "mctf", dict(MCTF_FAST), "0.75"),
    ("deit_small_patch16_224", "baseline", "none", {}, "4.61"),
    ("deit_small_patch16_224", "MCTF r=16", "mctf", {"r": 16}, "2.60"),
    ("deit_small_patch16_224", "MCTF-Fast", "mctf", dict(MCTF_FAST), "2.76"),
    ("deit_small_patch16_224", "ToMe r=13", "tome", {"r": 13}, None),
    ("deit_small_patch16_224", "PiToMe 0.925", "pitome", {"ratio": 0.925}, None),
    ("deit_small_patch16_224", "ToFu r=13", "tofu", {"r": 13}, None),
    ("deit_small_patch16_224", "EViT 0.7", "evit", STAGES, "3.0"),
    ("deit_small_patch16_224", "Top-K 0.7", "topk", STAGES, None),
    ("deit_small_patch16_224", "MSTM-like 0.7", "mstm", STAGES, None),
    ("deit_small_patch16_224", "DynamicViT 0.7", "dynamicvit", {}, "2.9"),
    ("deit_small_patch16_224", "PPT r=50", "ppt", {"r": 50, "layers": [3, 6, 9]}, "2.94"),
    ("vit_base_patch16_224", "baseline", "none", {}, None),
    ("vit_base_patch16_224", "ToMe r=13", "tome", {"r": 13}, None),
    ("vit_base_patch16_224", "PiToMe 0.925", "pitome", {"ratio": 0.925}, None),
]


def measure(model_name: str, reducer: str, params: dict) -> tuple[float, int]:
    model = tokenreduce.apply(timm.create_model(model_name).eval(), reducer, **params)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    stats = tokenreduce.stats(model)
    return stats["macs"] / 1e9, stats["tokens"][-1]


def main() -> None:
    print(f"{'model':<24}{'method':<16}{'GMACs':>7}{'published':>11}{'tokens out':>12}")
    for model_name, label, reducer, params, published in ROWS:
        gmacs, tokens = measure(model_name, reducer, params)
        paper = published or "-"
        print(f"{model_name:<24}{label:<16}{gmacs:>7.2f}{paper:>11}{tokens:>12}")


if __name__ == "__main__":
    main()
