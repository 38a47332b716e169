"""Turn the result records of many runs (a sweep) into one table and two trade-off plots.

    python -m tokenreduce.engine.collect outputs/sweeps/2025-01-01/12-00-00-000000 [more dirs] --out DIR
    tokenreduce-collect outputs/sweeps/...            # the same, once installed

Writes `results.csv`, `results.md`, `accuracy_vs_throughput.png` and `accuracy_vs_macs.png`. A Hydra
multirun does this by itself in its sweep directory when the last job ends
(`tokenreduce.engine.hydra_callbacks.CollectOnMultirunEnd`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from tokenreduce.engine.config import non_default_params
from tokenreduce.engine.record import RECORD_JSON
from tokenreduce.errors import ConfigError

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"
PLOT_THROUGHPUT = "accuracy_vs_throughput.png"
PLOT_MACS = "accuracy_vs_macs.png"
COLUMNS = ("model", "reducer", "params", "top1", "top5", "images_per_s", "speedup", "gmacs", "mac_ratio",
           "tokens_out", "dataset", "split", "run_name", "output_dir")


def find_records(paths: list[str | Path]) -> list[dict]:
    """Every result record under `paths` (record files or directories searched recursively), oldest first."""
    records = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob(RECORD_JSON))
        for file in files:
            with open(file) as f:
                record = json.load(f)
            record.setdefault("output_dir", str(file.parent))
            records.append(record)
    return sorted(records, key=lambda r: (r.get("finished", ""), r.get("output_dir", "")))


def _params_label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None) if params else ""


def _comparable(record: dict) -> tuple:
    """Runs compared against one baseline share the model, data, split and measuring protocol."""
    measure = record.get("measure") or {}
    dataset = record.get("dataset") or {}
    return (record.get("model"), dataset.get("name"), record.get("split"), measure.get("batch_size"),
            measure.get("dtype"), measure.get("autocast"), measure.get("device"))


def table_rows(records: list[dict]) -> list[dict]:
    """One row per run; speedup and MAC ratio against the newest unreduced run (reducer "none")
    with the same model, data and measuring protocol, when there is one."""
    baselines = {}
    for record in records:
        if record.get("reducer") == "none":
            baselines[_comparable(record)] = record
    rows = []
    for record in records:
        base = baselines.get(_comparable(record))
        ips, gmacs = record.get("images_per_s"), record.get("gmacs")
        rows.append({
            "model": record.get("model"),
            "reducer": record.get("reducer"),
            "params": _params_label(_changed_params(record)),
            "top1": record.get("top1"),
            "top5": record.get("top5"),
            "images_per_s": ips,
            "speedup": ips / base["images_per_s"] if base and ips and base.get("images_per_s") else None,
            "gmacs": gmacs,
            "mac_ratio": base["gmacs"] / gmacs if base and gmacs and base.get("gmacs") else None,
            "tokens_out": record.get("tokens_out"),
            "dataset": (record.get("dataset") or {}).get("name"),
            "split": record.get("split"),
            "run_name": record.get("run_name"),
            "output_dir": record.get("output_dir"),
        })
    return rows


def _changed_params(record: dict) -> dict:
    """The reducer parameters that differ from the reducer's defaults (all of them if it is unknown)."""
    params = record.get("reducer_params") or {}
    try:
        return non_default_params(record.get("reducer"), params)
    except ConfigError:  # a reducer not registered in this installation
        return params


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_markdown(rows: list[dict], columns: tuple[str, ...] = COLUMNS[:10]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def plot_tradeoff(rows: list[dict], x_key: str, xlabel: str, path: Path, log_x: bool = False) -> bool:
    """Top-1 against `x_key`, one line per method (per model and method when several models);
    the unreduced model is a star. False when no row has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get(x_key) is not None and r.get("top1") is not None]
    if not points:
        return False
    several_models = len({r["model"] for r in points}) > 1
    groups: dict[str, list[dict]] = {}
    for row in points:
        label = f"{row['model']} {row['reducer']}" if several_models else row["reducer"]
        groups.setdefault(label, []).append(row)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for label, group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r[x_key])
        xs = [r[x_key] for r in group]
        ys = [100 * r["top1"] for r in group]
        if group[0]["reducer"] == "none":
            ax.scatter(xs, ys, marker="*", s=160, zorder=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
            for r, x, y in zip(group, xs, ys, strict=True):
                if r["params"]:
                    ax.annotate(r["params"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    if log_x:
        ax.set_xscale("log")
    models = sorted({r["model"] for r in points})
    datasets = sorted({f"{r['dataset']} ({r['split']})" for r in points if r.get("dataset")})
    ax.set_title(", ".join(models) + (" on " + ", ".join(datasets) if datasets else ""), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def collect(paths: list[str | Path], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write the table (CSV and Markdown) and, with `plots`, the two PNG plots into `out_dir`."""
    records = find_records(paths)
    if not records:
        raise FileNotFoundError(f"no {RECORD_JSON} under {', '.join(map(str, paths))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(records)
    written = {"csv": out_dir / TABLE_CSV, "markdown": out_dir / TABLE_MD}
    write_csv(rows, written["csv"])
    written["markdown"].write_text(format_markdown(rows) + "\n")
    if plots:
        if plot_tradeoff(rows, "images_per_s", "images / s", out_dir / PLOT_THROUGHPUT):
            written["throughput_plot"] = out_dir / PLOT_THROUGHPUT
        if plot_tradeoff(rows, "gmacs", "GMACs per image", out_dir / PLOT_MACS):
            written["macs_plot"] = out_dir / PLOT_MACS
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenreduce-collect", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run or sweep directories, or result.json files")
    parser.add_argument("--out", default=None, help="where to write the table and plots (default: the first path)")
    parser.add_argument("--no-plots", action="store_true", help="write only the table")
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] if Path(args.paths[0]).is_dir() else Path(args.paths[0]).parent)
    written = collect(args.paths, out, plots=not args.no_plots)
    print((Path(out) / TABLE_MD).read_text())
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
