"""Turn the result records of many runs (a sweep) into one table and trade-off plots.

    tokenreduce-collect PATH [PATH ...] [--out DIR] [--no-plots]
    python -m tokenreduce.engine.collect PATH [PATH ...] [--out DIR] [--no-plots]

PATH: run or sweep directories (searched for `result.json`) or `result.json` files. --out defaults
to the first PATH (its folder when it is a file).

Numbers are compared only within a protocol: runs with the same model, weights, task, dataset,
data (its resolved root and the data module's other settings), split, number of evaluated images and
measuring protocol (dtype, autocast, batch size, device), see `protocol_key`. Protocols are numbered
p1, p2, ... in the order of their oldest run. Each run's speedup (its images/s over the baseline's, x) and
MAC fraction (its MACs over the baseline's, 0..1 for a reducer) are against its protocol's baseline, the
newest run with reducer "none" (a baseline's own are 1.0), named in the `baseline` column and listed
first; a protocol without a baseline has none. top1 and top5 are fractions (0..1), as in the records. Such a speed-up is measured across
processes (the run's images/s and the baseline's were timed in two runs) and marked ACROSS; timings
whose rounds disagree or that ran on a loaded machine are marked too (`tokenreduce.engine.speed`).

Written into --out:
  results.csv   one row per run, grouped by protocol, with every column (`COLUMNS`)
  results.md    the table, then one line per protocol: what it is and what its ratios are against,
                then the legend of the marks
  accuracy_vs_throughput.png, accuracy_vs_macs.png
                top-1 against images/s and GMACs per image (`tokenreduce.viz.plot_tradeoff`): one
                line per method (reducer and non-default parameters other than its strength), its
                points in order of strength, the baseline a black star. A plot never mixes
                protocols: with several, each gets its own pair, suffixed with its number
                (accuracy_vs_throughput_p1.png, accuracy_vs_macs_p1.png, ..._p2.png, ...).
A report is never overwritten: when any of these files is already in --out, nothing is written.
Records whose `status` is present and not "finished" are skipped, with a warning saying how many.

A Hydra multirun does this by itself in its sweep directory when the last job ends
(`tokenreduce.engine.hydra_callbacks.CollectOnMultirunEnd`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

from tokenreduce.engine.config import non_default_params
from tokenreduce.engine.record import RECORD_JSON, write_new
from tokenreduce.engine.speed import TIMING_LEGEND, timing_marks, union_marks
from tokenreduce.errors import ConfigError
from tokenreduce.reducers import reducer_class

log = logging.getLogger(__name__)

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"
BASELINE = "none"
PLOTS = {"throughput": ("images_per_s", "accuracy_vs_throughput"), "macs": ("gmacs", "accuracy_vs_macs")}  # x, stem
ACROSS = "*"  # the mark of a speed-up whose two images/s were timed in different processes
# the fields of `protocol_key`, in its order; they are columns too
PROTOCOL = ("model", "weights", "task", "dataset", "data", "split", "images", "dtype", "autocast", "batch_size",
            "device")
COLUMNS = ("protocol", "model", "weights", "task", "reducer", "params", "top1", "top5", "images_per_s", "speedup",
           "gmacs", "mac_fraction", "tokens_out", "dataset", "split", "dtype", "autocast", "batch_size", "device",
           "baseline", "run_name", "output_dir", "data", "images", "spread", "load_before", "load_after", "cores",
           "timing_marks", "speedup_marks")
# Markdown cells followed by their marks
MARKED = {"images_per_s": "timing_marks", "speedup": "speedup_marks"}
LEGEND = (f"Marks: {TIMING_LEGEND}; {ACROSS} a speed-up across processes: the run's images/s over its baseline's, "
          "timed in two runs, so a load that differed between them is in the ratio (task=compare times them side by "
          "side in one process).")
MARKDOWN_COLUMNS = ("protocol", "model", "weights", "task", "reducer", "params", "top1", "top5", "images_per_s",
                    "speedup", "gmacs", "mac_fraction", "tokens_out", "baseline")


def find_records(paths: list[str | Path]) -> list[dict]:
    """Every finished run's record under `paths` (record files or directories searched recursively),
    oldest first. A missing path, one without records, or a record that is not JSON is a ConfigError."""
    records, skipped, seen = [], [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path} does not exist; allowed: run or sweep directories, or {RECORD_JSON} files")
        files = [path] if path.is_file() else sorted(path.rglob(RECORD_JSON))
        if not files:
            raise ConfigError(f"{path} holds no {RECORD_JSON}: there is no run to collect")
        for file in files:
            if file.resolve() in seen:  # a run named twice (its sweep and itself) is one run
                continue
            seen.add(file.resolve())
            record = _read(file)
            record["output_dir"] = record.get("output_dir") or str(file.parent)
            # a failed or unfinished run has no numbers to compare
            (records if record.get("status", "finished") == "finished" else skipped).append(record)
    if skipped:
        log.warning("skipped %d run(s) whose status is not 'finished': %s", len(skipped),
                    ", ".join(r["output_dir"] for r in skipped))
    if not records:
        raise ConfigError(f"no finished run under {', '.join(map(str, paths))} ({len(skipped)} skipped)")
    return sorted(records, key=lambda r: (r.get("finished") or "", r["output_dir"]))


def _read(file: Path) -> dict:
    try:
        with open(file) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not a readable run record: {err}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{file} is not a run record: it holds a JSON {type(record).__name__}, not an object")
    for key in ("top1", "top5"):  # accuracies are fractions everywhere; a percentage would mix units
        value = record.get(key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ConfigError(f"{file}: {key}={value!r} is not an accuracy; allowed: a fraction from 0 to 1, or null")
    return record


def protocol_key(record: dict) -> tuple:
    """What two runs must share for their accuracies and speeds to be compared (fields: `PROTOCOL`):
    among them the data, as its module describes it (`describe()`: the resolved root, subset and
    generator settings), and the number of images of the evaluated split."""
    measure = record.get("measure") or {}
    dataset = record.get("dataset") or {}
    images = (dataset.get("images") or {}).get(record.get("split"))
    return (record.get("model"), record.get("weights"), record.get("task"), dataset.get("name"), _data_label(dataset),
            record.get("split"), images, measure.get("dtype"), measure.get("autocast"), measure.get("batch_size"),
            measure.get("device"))


def _data_label(dataset: dict) -> str:
    """The data module's description other than its name and image counts, as `key=value` words."""
    def word(value) -> str:
        if isinstance(value, dict):
            return ",".join(f"{k}:{v}" for k, v in value.items())
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return " ".join(f"{k}={word(v)}" for k, v in dataset.items() if k not in ("name", "images") and v is not None)


def protocols(records: list[dict]) -> dict[str, tuple[tuple, list[dict]]]:
    """Protocol number ("p1", "p2", ...) -> (its key, its records), numbered in the order of `records`."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(protocol_key(record), []).append(record)
    return {f"p{n}": group for n, group in enumerate(groups.items(), 1)}


def newest_baseline(records: list[dict]) -> dict | None:
    """The last unreduced run of oldest-first `records`, or None."""
    return next((r for r in reversed(records) if r.get("reducer") == BASELINE), None)


def table_rows(records: list[dict]) -> list[dict]:
    """One row per run (`COLUMNS`, plus `reducer_params` and `method` for the plots), grouped by
    protocol, its baseline first; speedup and MAC fraction against its protocol's newest baseline."""
    rows = []
    for number, (key, group) in protocols(records).items():
        base = newest_baseline(group)
        for record in sorted(group, key=lambda r: r is not base):  # stable: the rest stay oldest first
            # a baseline is compared only with itself, never with another baseline
            against = record if record.get("reducer") == BASELINE else base
            ips, gmacs = record.get("images_per_s"), record.get("gmacs")
            measure = record.get("measure") or {}
            marks = timing_marks(measure)
            speedup = _ratio(ips, against and against.get("images_per_s"))
            if speedup is not None and against is not record:  # as doubtful as the less steady of its timings
                speedup_marks = union_marks(marks, timing_marks(against.get("measure") or {})) + ACROSS
            else:
                speedup_marks = marks if speedup is not None else ""
            rows.append({
                "protocol": number,
                **dict(zip(PROTOCOL, key, strict=True)),
                "reducer": record.get("reducer"),
                "params": _params_label(_changed_params(record)),
                "top1": record.get("top1"),
                "top5": record.get("top5"),
                "images_per_s": ips,
                "speedup": speedup,
                "gmacs": gmacs,
                "mac_fraction": _ratio(gmacs, against and against.get("gmacs")),
                "tokens_out": record.get("tokens_out"),
                "baseline": against["output_dir"] if against else None,
                "run_name": record.get("run_name"),
                "output_dir": record["output_dir"],
                "reducer_params": record.get("reducer_params") or {},
                "method": _method(record),
                **{k: measure.get(k) for k in ("spread", "load_before", "load_after", "cores")},
                "timing_marks": marks if ips is not None else "",
                "speedup_marks": speedup_marks,
            })
    return rows


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def _changed_params(record: dict) -> dict:
    """The reducer parameters that differ from the reducer's defaults (all of them if it is unknown),
    and the model family's options that differ from theirs (e.g. merged_position=mean)."""
    params = record.get("reducer_params") or {}
    try:
        changed = non_default_params(record.get("reducer"), params)
    except ConfigError:  # a reducer not registered in this installation
        changed = params
    return {**changed, **(record.get("adapter_options") or {})}


def _method(record: dict) -> str:
    """The plot line of a run: its reducer and non-default parameters other than the strength, so
    that a sweep over, e.g., prop_attn draws one line per value instead of one zigzag."""
    reducer = str(record.get("reducer"))
    try:
        strength = {s.param for s in reducer_class(reducer).strength}
    except ConfigError:  # an unknown reducer: which parameter is its strength cannot be told
        return reducer
    others = {k: v for k, v in _changed_params(record).items() if k not in strength}
    return f"{reducer} {_params_label(others)}".strip()


def _params_label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None) if params else ""


def describe(key: tuple, sep: str = "; ") -> str:
    """A protocol in words: what was run, on which data, then how images/s was measured."""
    p = dict(zip(PROTOCOL, key, strict=True))
    measured = ", ".join(f"{k} {p[k]}" for k in ("dtype", "autocast", "batch_size", "device") if p[k] is not None)
    images = f", {p['images']} images" if p["images"] is not None else ""
    return (f"{p['model']} ({p['weights']}), {p['task']} on {p['dataset']} {p['split']}{images}{sep}"
            f"data: {p['data'] or '-'}{sep}measured: {measured or '-'}")


def protocol_notes(records: list[dict]) -> list[str]:
    """One line per protocol for the report: what it is and what its ratios are against."""
    notes = []
    for number, (key, group) in protocols(records).items():
        base = newest_baseline(group)
        count = sum(r.get("reducer") == BASELINE for r in group)
        if base is None:
            against = "no baseline (reducer none): no speedup or MAC fraction"
        elif count > 1:
            against = f"ratios against the newest of its {count} baselines, {base['output_dir']}"
        else:
            against = f"ratios against {base['output_dir']}"
        notes.append(f"- {number}: {describe(key)}; {against}")
    return notes


def _cell(value, column: str = "") -> str:
    if value is None or value == "":
        return "-"
    if column == "speedup":  # a ratio, written as everywhere in the project
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_markdown(rows: list[dict], columns: tuple[str, ...] = MARKDOWN_COLUMNS) -> str:
    """The rows as a Markdown table, images/s and speed-ups followed by their marks (`LEGEND`)."""
    def cell(row: dict, column: str) -> str:
        return f"{_cell(row[column], column)} {row.get(MARKED.get(column), '')}".rstrip()

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plot_rows(rows: list[dict], number: str, base: dict | None, x: str) -> list[dict]:
    """The rows of protocol `number` with top-1, GMACs and `x`, as `plot_tradeoff` takes them; of its
    baselines only `base`, the one its ratios are against."""
    points = []
    for row in rows:
        if row["protocol"] != number or any(row[k] is None for k in ("top1", "gmacs", x)):
            continue
        if row["reducer"] == BASELINE and row["output_dir"] != base["output_dir"]:
            continue
        points.append({"reducer": row["reducer"], "method": row["method"], "params": row["reducer_params"],
                       "top1": row["top1"], "gmacs": row["gmacs"], "images_per_s": row["images_per_s"]})
    return points


def collect(paths: list[str | Path], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write the table (CSV and Markdown) and, with `plots`, the trade-off plots into `out_dir`;
    returns what was written by kind ("csv", "markdown", "throughput_plot", "macs_plot", with "_p<n>"
    when there are several protocols). Refuses (ConfigError) before writing anything when one of
    these files exists."""
    records = find_records(paths)
    rows = table_rows(records)
    out_dir = Path(out_dir)
    planned = {"csv": out_dir / TABLE_CSV, "markdown": out_dir / TABLE_MD}
    charts = {}  # kind -> (rows, x, title)
    groups = protocols(records) if plots else {}
    for number, (key, group) in groups.items():
        base = newest_baseline(group)
        title = f"{number}: " + describe(key, sep="\n")
        suffix = f"_{number}" if len(groups) > 1 else ""  # one protocol per plot
        for kind, (x, stem) in PLOTS.items():
            points = _plot_rows(rows, number, base, x)
            if any(p["reducer"] != BASELINE for p in points):
                planned[f"{kind}_plot{suffix}"] = out_dir / f"{stem}{suffix}.png"
                charts[f"{kind}_plot{suffix}"] = (points, x, title)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; allowed: a directory")
    existing = [str(p) for p in planned.values() if p.exists()]
    if existing:
        raise ConfigError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} from an earlier "
                          "report, which is never overwritten: pick another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_new(planned["csv"], csv_text(rows))
    write_new(planned["markdown"], format_markdown(rows) + "\n\n" + "\n".join(protocol_notes(records)) + "\n\n"
              + LEGEND + "\n")
    if charts:
        from tokenreduce import viz  # matplotlib only when plotting

        for kind, (points, x, title) in charts.items():
            viz.plot_tradeoff(points, x, planned[kind], title=title)
    return planned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenreduce-collect", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run or sweep directories, or result.json files")
    parser.add_argument("--out", default=None, help="where to write the table and plots (default: the first path)")
    parser.add_argument("--no-plots", action="store_true", help="write only the table")
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] if Path(args.paths[0]).is_dir() else Path(args.paths[0]).parent)
    try:
        written = collect(args.paths, out, plots=not args.no_plots)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(written["markdown"].read_text())
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
