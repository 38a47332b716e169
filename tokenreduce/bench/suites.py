"""The cases `make bench` measures, by suite. Each method family adds its reference settings here."""

from tokenreduce.bench.harness import Case

KEEP_RATIOS = (0.9, 0.925)

SUITES: dict[str, list[Case]] = {
    "tome": [Case(f"tome r={r}", "tome", {"r": r}) for r in (8, 13, 16)],
    "pitome": [Case(f"pitome ratio={k}", "pitome", {"ratio": k}) for k in KEEP_RATIOS],
    "tofu": [Case(f"tofu ratio={k}", "tofu", {"ratio": k}) for k in KEEP_RATIOS],
}
