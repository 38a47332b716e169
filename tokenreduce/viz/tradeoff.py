"""Accuracy against cost: one line per reducer, the unreduced baseline as a black star."""

from __future__ import annotations

import numbers
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokenreduce.errors import ConfigError

X_AXES = {
    "mac_fraction": "MACs (fraction of the unreduced model)",
    "speedup": "speed-up (images/s over the unreduced model)",
}
BASELINE = "none"
# tab10 without its grey, so that no method shares the baseline's neutral colour
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LABEL_SIZE = 7  # points
OFFSETS = (5, -13, 15, -23, 25, -33, 35)  # vertical label offsets tried in turn, in points


def plot_tradeoff(rows: list[dict], x: str, path: str | Path | None = None, *, title: str | None = None,
                  label_points: str = "ends") -> Figure:
    """Top-1 accuracy against `x` ("mac_fraction" or "speedup"), one line per reducer.

    rows:  dicts with `reducer`, `params` (dict), `mac_fraction`, `top1` and, for x="speedup",
           `speedup`; other keys are ignored. The row whose reducer is "none" (at most one) is the
           baseline, drawn as a black star on top of everything.
    path:  where to save a PNG; an existing file is never overwritten.
    label_points: "ends" labels the first and last point of each line with the parameters that
           vary along it, "all" labels every point, "none" labels nothing.

    A reducer's points are joined in order of their MAC fraction. Returns the Figure.
    """
    if x not in X_AXES:
        raise ConfigError(f"x={x!r} is invalid; allowed: {', '.join(map(repr, X_AXES))}")
    if label_points not in ("ends", "all", "none"):
        raise ConfigError(f"label_points={label_points!r} is invalid; allowed: 'ends', 'all', 'none'")
    target = _check_path(path)
    lines, baseline = _group(rows, x)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = []
    for k, (reducer, points) in enumerate(lines.items()):
        colour, marker = COLOURS[k % len(COLOURS)], MARKERS[k % len(MARKERS)]
        ax.plot([p[x] for p in points], [p["top1"] for p in points], color=colour, marker=marker,
                markersize=6, linewidth=1.5, label=reducer, zorder=2)
        labels += _labels(points, x, colour, label_points)
    if baseline is not None:
        ax.axhline(baseline["top1"], color="0.6", linestyle=":", linewidth=0.8, zorder=1)
        ax.scatter([baseline[x]], [baseline["top1"]], marker="*", s=220, color="black", edgecolors="white",
                   linewidths=0.8, label="none (baseline)", zorder=5)
    _place(ax, fig, labels, [] if baseline is None else [(baseline[x], baseline["top1"])])
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("top-1 accuracy")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    if target is not None:
        fig.savefig(target, dpi=150)
    return fig


def _check_path(path) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"path={path!r} is invalid; allowed: a file path or None")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"path={str(path)!r} is invalid; allowed: a file ending in .png")
    if target.exists():
        raise ConfigError(f"path={str(path)!r} already exists; allowed: a path to a new file (it is not overwritten)")
    if not target.parent.is_dir():
        raise ConfigError(f"path={str(path)!r} is invalid; allowed: a file in an existing folder")
    return target


def _group(rows, x: str) -> tuple[dict[str, list[dict]], dict | None]:
    """The rows of each reducer (first-seen order) sorted by MAC fraction, and the baseline row."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ConfigError(f"rows={rows!r} is invalid; allowed: a non-empty list of dicts")
    needed = ("mac_fraction", "top1") + ((x,) if x != "mac_fraction" else ())
    lines: dict[str, list[dict]] = {}
    baselines = []
    for i, row in enumerate(rows):
        named = isinstance(row, dict) and isinstance(row.get("reducer"), str)
        if not named or not isinstance(row.get("params"), dict):
            raise ConfigError(f"rows[{i}]={row!r} is invalid; allowed: a dict with 'reducer' (str) and 'params' (dict)")
        for key in needed:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                raise ConfigError(f"rows[{i}][{key!r}]={value!r} is invalid; allowed: a number")
        if row["reducer"] == BASELINE:
            baselines.append(row)
        else:
            lines.setdefault(row["reducer"], []).append(row)
    if len(baselines) > 1:
        raise ConfigError(f"rows hold {len(baselines)} rows with reducer='none'; allowed: at most one baseline")
    for points in lines.values():
        points.sort(key=lambda p: (p["mac_fraction"], p[x]))
    return lines, (baselines[0] if baselines else None)


def _varying(points: list[dict]) -> list[str]:
    """The parameters whose values differ along one line: what tells its points apart."""
    keys = sorted({k for p in points for k in p["params"]})
    return [k for k in keys if len({repr(p["params"].get(k)) for p in points}) > 1]


def _labels(points: list[dict], x: str, colour: str, mode: str) -> list[tuple]:
    """(x, y, text, colour) of the points to label: the parameters that vary along the line."""
    keys = _varying(points)
    if mode == "none" or not keys:
        return []
    chosen = points if mode == "all" or len(points) <= 2 else [points[0], points[-1]]
    return [(p[x], p["top1"], ", ".join(f"{k}={_short(p['params'].get(k))}" for k in keys), colour) for p in chosen]


def _place(ax, fig: Figure, labels: list[tuple], occupied: list[tuple]) -> None:
    """Annotate each label at the first vertical offset where it overlaps no label placed before
    (nor the baseline star), so labels of lines that meet do not pile up."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    box = ax.get_position()
    width_pt, height_pt = box.width * fig.get_figwidth() * 72, box.height * fig.get_figheight() * 72

    def to_points(px, py):
        return (px - x0) / ((x1 - x0) or 1) * width_pt, (py - y0) / ((y1 - y0) or 1) * height_pt

    # boxes in points: (left, bottom, right, top)
    placed = [(cx - 8, cy - 8, cx + 8, cy + 8) for cx, cy in (to_points(*o) for o in occupied)]
    for px, py, text, colour in labels:
        lx, ly = to_points(px, py)
        width = 0.6 * LABEL_SIZE * len(text)
        for dy in OFFSETS:
            left, bottom = lx + 4, ly + dy - 1
            right, top = left + width, bottom + LABEL_SIZE + 2
            if not any(left < q[2] and q[0] < right and bottom < q[3] and q[1] < top for q in placed):
                break
        placed.append((left, bottom, right, top))
        ax.annotate(text, (px, py), xytext=(4, dy), textcoords="offset points", fontsize=LABEL_SIZE, color=colour)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)
