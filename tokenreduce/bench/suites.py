"""The cases `make bench` measures, by suite. Each method family adds its reference settings here."""

from tokenreduce.bench.harness import Case
from tokenreduce.reducers.mctf import MCTF_FAST

EVIT_SETTING = {"ratio": 0.7, "layers": [3, 6, 9]}

KEEP_RATIOS = (0.9, 0.925)

SUITES: dict[str, list[Case]] = {
    "tome": [Case(f"tome r={r}", "tome", {"r": r}) for r in (8, 13, 16)],
    "pitome": [Case(f"pitome ratio={k}", "pitome", {"ratio": k}) for k in KEEP_RATIOS],
    "tofu": [Case(f"tofu ratio={k}", "tofu", {"ratio": k}) for k in KEEP_RATIOS],
    "mctf": [
        Case("mctf r=16 one-step", "mctf", {"r": 16, "mode": 1}),
        Case("mctf r=16 recompute", "mctf", {"r": 16, "mode": 2}),
        Case("mctf-fast", "mctf", dict(MCTF_FAST)),
    ],
    "pruning": [
        Case("evit 0.7@3,6,9", "evit", EVIT_SETTING),
        Case("topk 0.7@3,6,9", "topk", EVIT_SETTING),
        Case("norm 0.7@3,6,9", "norm", EVIT_SETTING),
        Case("random 0.7@3,6,9", "random", EVIT_SETTING),
    ],
    "mstm": [Case("mstm-like 0.7@3,6,9", "mstm", EVIT_SETTING)],
    "dynamicvit": [Case("dynamicvit inference", "dynamicvit", {})],
    "atc": [
        Case("atc 0.7@3,6,9", "atc", EVIT_SETTING),
        Case("atc r=13", "atc", {"r": 13}),
    ],
    "compose": [Case("topk 0.8@3 + tome r=8", "compose", {})],  # conf/reducer/compose.yaml's parts
    "ppt": [Case("ppt r=50@3,6,9", "ppt", {})],  # the reference setting
    "zerotprune": [Case("zerotprune r=11", "zerotprune", {})],  # about the paper's -34.7% MACs on DeiT-S
    "diffrate": [Case("diffrate DeiT-S 2.9G", "diffrate", {})],  # the published searched schedule
}
