"""Accuracy against cost: one line per reducer, the unreduced baseline as a black star."""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from tokenreduce.engine.record import save_figure
from tokenreduce.errors import ConfigError
from tokenreduce.reducers import reducer_class

X_AXES = {
    "mac_fraction": "MACs (fraction of the unreduced model)",
    "speedup": "speed-up (images/s over the unreduced model)",
    "gmacs": "GMACs per image",
    "images_per_s": "images / s",
}
# the cost each axis needs, which orders a line whose strength is unknown: relative axes take the
# MAC fraction, absolute ones GMACs (both fall as a reducer removes more)
COST = {"mac_fraction": "mac_fraction", "speedup": "mac_fraction", "gmacs": "gmacs", "images_per_s": "gmacs"}
BASELINE = "none"
# tab10 without its grey, so that no method shares the baseline's neutral colour, then darker
# tones of tab20b, so that every registered method gets its own colour
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LABEL_SIZE = 7  # points
# label offsets from their point (points), nearest first: right or left, above or below
SPOTS = tuple((dx, dy) for d in (3, 12, 22, 32) for dy in (d, -d) for dx in (5, -5))


def plot_tradeoff(rows: list[dict], x: str, path: str | Path | None = None, *, title: str | None = None,
                  label_points: str = "ends") -> Figure:
    """Top-1 accuracy against `x`, one line per reducer: "mac_fraction" or "speedup" (relative to the
    unreduced model), or "gmacs" or "images_per_s" (absolute, for runs without a baseline).

    rows:  dicts with `reducer`, `params` (dict), `top1`, `x` and its cost (`COST`): `mac_fraction`
           for the relative axes, `gmacs` for the absolute ones; optionally `method` (str), the
           line a row belongs to when it is not simply its reducer (e.g. "tome mode=mean"); other
           keys are ignored. The row whose reducer is "none" (at most one) is the baseline, drawn
           as a black star on top of everything.
    path:  where to save a PNG; an existing file is never overwritten.
    label_points: "ends" labels the first and last point of each line with the parameters that
           vary along it, "all" labels every point, "none" labels nothing.

    A line's points are joined in order of its reducer's strength parameter (`TokenReducer.strength`,
    strongest first) when every point sets it, else in order of its cost (fewest MACs first, the
    same direction): never by x, whose measured speeds can be noisy. Returns the Figure.
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
    for k, (method, points) in enumerate(lines.items()):
        colour, marker = COLOURS[k % len(COLOURS)], MARKERS[k % len(MARKERS)]
        ax.plot([p[x] for p in points], [p["top1"] for p in points], color=colour, marker=marker,
                markersize=6, linewidth=1.5, label=method, zorder=2)
        labels += _labels(points, x, colour, label_points)
    if baseline is not None:
        ax.axhline(baseline["top1"], color="0.6", linestyle=":", linewidth=0.8, zorder=1)
        ax.scatter([baseline[x]], [baseline["top1"]], marker="*", s=220, color="black", edgecolors="white",
                   linewidths=0.8, label="none (baseline)", zorder=5)
    ax.margins(0.08)  # room for the labels of the end points
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("top-1 accuracy")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    _place(ax, fig, labels, [] if baseline is None else [(baseline[x], baseline["top1"])])
    if target is not None:
        save_figure(fig, target, dpi=150)
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
    """The rows of each method (first-seen order) in line order (`_line_order`), and the baseline row."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ConfigError(f"rows={rows!r} is invalid; allowed: a non-empty list of dicts")
    needed = dict.fromkeys((COST[x], "top1", x))
    lines: dict[str, list[dict]] = {}
    baselines = []
    for i, row in enumerate(rows):
        named = isinstance(row, dict) and isinstance(row.get("reducer"), str)
        if not named or not isinstance(row.get("params"), dict):
            raise ConfigError(f"rows[{i}]={row!r} is invalid; allowed: a dict with 'reducer' (str) and 'params' (dict)")
        if not isinstance(row.get("method", ""), str):
            raise ConfigError(f"rows[{i}]['method']={row['method']!r} is invalid; allowed: a str")
        for key in needed:
            if not _is_number(row.get(key)):
                raise ConfigError(f"rows[{i}][{key!r}]={row.get(key)!r} is invalid; allowed: a number")
        if row["reducer"] == BASELINE:
            baselines.append(row)
        else:
            lines.setdefault(row.get("method") or row["reducer"], []).append(row)
    if len(baselines) > 1:
        raise ConfigError(f"rows hold {len(baselines)} rows with reducer='none'; allowed: at most one baseline")
    for points in lines.values():
        points.sort(key=_line_order(points, x))
    return lines, (baselines[0] if baselines else None)


def _line_order(points: list[dict], x: str):
    """Sort key of one line's points: the reducer's first strength parameter that every point sets
    to a number, strongest first; else the cost (`COST`), smallest (= strongest) first."""
    cost = COST[x]
    try:
        strengths = reducer_class(points[0]["reducer"]).strength
    except ConfigError:  # a reducer this installation does not know
        strengths = ()
    for s in strengths:
        if all(_is_number(p["params"].get(s.param)) for p in points):
            sign = -1 if s.larger_removes else 1
            return lambda p: (sign * p["params"][s.param], p[cost], p[x])
    return lambda p: (p[cost], p[x])


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


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


def _place(ax, fig: Figure, labels: list[tuple], star: list[tuple]) -> None:
    """Annotate each label at the spot (of `SPOTS`) that overlaps the fewest labels placed before
    and data points (markers, the baseline `star`), then stays inside the axes, then crosses the
    fewest lines; measured on the settled layout in display units, so what is checked is what is drawn."""
    fig.draw_without_rendering()  # run the layout: the axes' final size and place
    renderer = fig.canvas.get_renderer()
    pt = fig.dpi / 72  # display units per point

    def boxes(xy, radius: float) -> list[Bbox]:
        return [Bbox.from_extents(u - radius, v - radius, u + radius, v + radius) for u, v in xy]

    points, segments = boxes(ax.transData.transform(star), 8 * pt) if star else [], []
    for line in ax.lines:
        if line.get_marker() in (None, "", "None"):  # the baseline's dotted accuracy line
            continue
        xy = ax.transData.transform(line.get_xydata())
        points += boxes(xy, 4 * pt)
        segments += boxes([a + t * (b - a) for a, b in zip(xy[:-1], xy[1:], strict=True) for t in np.linspace(0, 1, 16)], pt)
    frame = ax.get_window_extent(renderer)
    for px, py, text, colour in labels:
        note = ax.annotate(text, (px, py), xytext=SPOTS[0], textcoords="offset points", fontsize=LABEL_SIZE,
                           color=colour)
        note.set_in_layout(False)  # labels must not move the axes they were placed in
        costs = []
        for spot in SPOTS:
            box = _move(note, spot, renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            costs.append((sum(box.overlaps(q) for q in points), not inside, sum(box.overlaps(q) for q in segments)))
        best = SPOTS[costs.index(min(costs))]  # the first of equally good spots: the nearest
        points.append(_move(note, best, renderer))


def _move(note, spot: tuple[float, float], renderer) -> Bbox:
    """Put `note` at offset `spot` (points) from its point, extending away from it; its box on screen."""
    note.xyann = spot
    note.set(ha="left" if spot[0] > 0 else "right", va="bottom" if spot[1] > 0 else "top")
    return note.get_window_extent(renderer)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)
