"""The cases `make bench` measures, by suite. Each method family adds its reference settings here."""

from tokenreduce.bench.harness import Case

SUITES: dict[str, list[Case]] = {
    "tome": [Case(f"tome r={r}", "tome", {"r": r}) for r in (8, 13, 16)],
}
