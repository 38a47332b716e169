"""`task=compare`: the unreduced model beside every configured reducer at matched MAC fractions.

For each reducer and each target fraction of the baseline's MACs, `match_macs` sets the reducer's
strength; top-1 is measured on the evaluation split, images/s in interleaved timing rounds (so
machine noise hits every setting alike), and the table, its CSV, two trade-off plots and merge maps
are written into the run directory.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

import tokenreduce
from tokenreduce.cost import match_macs, probe_pass, searchable
from tokenreduce.data.transforms import model_data_config
from tokenreduce.engine.config import plain, settings_of
from tokenreduce.engine.console import Progress, progress, show
from tokenreduce.engine.record import COMPARISON_CSV as TABLE_CSV
from tokenreduce.engine.record import COMPARISON_JSON, csv_table, save_figure, write_new
from tokenreduce.engine.record import COMPARISON_TABLE as TABLE_MD
from tokenreduce.engine.speed import (
    TIMING_LEGEND,
    Load,
    check_measure,
    images_per_second,
    interleaved_times,
    load_average,
    spread,
    timing_marks,
    union_marks,
)
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.reducers.base import create_reducer, reducer_class

PLOT_MACS, PLOT_SPEED, MERGE_MAPS = "accuracy_vs_macs.png", "accuracy_vs_speed.png", "merge_maps.png"
CSV_COLUMNS = ("reducer", "params", "mac_fraction", "top1", "speedup", "tokens", "spread", "marks")


@dataclass
class CompareSettings:
    """reducers: the reducers to compare, by name; validation turns it into name -> fixed parameters.
    fixed: reducer name -> parameters held fixed while its strength is searched (a reducer not
    listed in `reducers` is ignored, so one config can serve several selections).
    mac_fractions: targets, as fractions of the unreduced model's MACs.
    images: evaluate on the first this many images of the split (None: all).
    tolerance: how far (relative) a matched setting may miss its target.
    merge_maps: how many evaluation images the merge-map figure shows (0: none).
    merge_map_fraction: the target whose settings the merge maps show."""

    reducers: list[str] = field(default_factory=list)
    fixed: dict[str, dict] = field(default_factory=dict)
    mac_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5])
    images: int | None = None
    tolerance: float = 0.02
    merge_maps: int = 4
    merge_map_fraction: float = 0.5

    def __post_init__(self):
        if isinstance(self.reducers, str) or not self.reducers:
            raise ConfigError(f"compare.reducers={self.reducers!r} is invalid; allowed: a list of reducer names from "
                              f"{', '.join(searchable())}")
        fixed = dict(self.fixed or {})
        self.reducers = {name: dict(fixed.get(name) or {}) for name in self.reducers}
        for name, params in self.reducers.items():
            strengths = reducer_class(name).strength  # an unknown name is a ConfigError here
            if not strengths:
                raise ConfigError(f"compare.reducers: {name} has no strength parameter to match MACs with; "
                                  f"allowed: {', '.join(searchable())}")
            searched = strengths[0].param
            if searched in params:
                raise ConfigError(f"compare.fixed.{name}.{searched}={params[searched]!r}: {searched} is set by the "
                                  f"MAC matching; remove it")
            create_reducer(name, **params)  # unknown or invalid fixed parameters fail now
        self.mac_fractions = list(self.mac_fractions or [])
        if not self.mac_fractions:
            raise ConfigError("compare.mac_fractions is empty; allowed: a list of fractions in (0, 1]")
        for value in self.mac_fractions:
            check_number("compare", "mac_fractions", value, low=0, high=1, low_open=True)
        check_number("compare", "tolerance", self.tolerance, low=0)
        if self.images is not None:
            check_number("compare", "images", self.images, low=1, integer=True)
        check_number("compare", "merge_maps", self.merge_maps, low=0, integer=True)
        if self.merge_maps and self.merge_map_fraction not in self.mac_fractions:
            raise ConfigError(f"compare.merge_map_fraction={self.merge_map_fraction!r} is not one of "
                              f"compare.mac_fractions={self.mac_fractions}; allowed: one of them")


@dataclass
class Setting:
    reducer: str
    params: dict
    target: float | None  # the MAC fraction asked for (None: the baseline)
    mac_fraction: float = 1.0
    top1: float | None = None
    speedup: float | None = None
    images_per_s: float | None = None
    tokens: int | None = None
    times: list[float] = field(default_factory=list)
    spread: float | None = None  # its timing rounds' quartile spread over their median (speed.spread)
    marks: str = ""  # its speed-up's timing marks (`timing_marks`): its own and the baseline's


def settings_from(cfg: DictConfig) -> CompareSettings:
    return settings_of(CompareSettings, cfg.get("compare"), "compare")


@torch.inference_mode()
def top1_accuracy(model: nn.Module, loader, limit: int | None = None,
                  on_batch: Callable[[], None] | None = None) -> tuple[float, int]:
    """(top-1, number of images) of `model` over `loader`, or over its first `limit` images;
    `on_batch()` is called after each batch (for progress)."""
    param = next(model.parameters())
    correct = total = 0
    for images, labels in loader:
        if limit is not None and total + len(labels) > limit:
            images, labels = images[: limit - total], labels[: limit - total]
        if not len(labels):
            break
        logits = model(images.to(device=param.device, dtype=param.dtype))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        total += len(labels)
        if on_batch is not None:
            on_batch()
    return correct / max(total, 1), total


def batch_count(loader, limit: int | None = None) -> int | None:
    """How many batches `top1_accuracy` reads from `loader` for `limit` images (None: unknown)."""
    try:
        count = len(loader)
    except TypeError:
        return None
    size = getattr(loader, "batch_size", None)
    return min(count, math.ceil(limit / size)) if limit is not None and size else count


def top1_of_each(model: nn.Module, loader, settings: list[Setting], limit: int | None, what: str,
                 on_done: Callable[[Setting], None] | None = None) -> int:
    """Top-1 and tokens out of every setting (each applied in turn), with progress over their batches;
    `on_done(setting)` after each. The number of images each was measured on."""
    batches = batch_count(loader, limit)
    count = 0
    with Progress(what, None if batches is None else batches * len(settings), "batches") as shown:
        for i, s in enumerate(settings, 1):
            shown.update(0, f"setting {i}/{len(settings)}: {s.reducer}"
                            + (f" {format_params(s.params)}" if s.params else ""))
            tokenreduce.apply(model, s.reducer, **s.params)
            s.top1, count = top1_accuracy(model, loader, limit, shown.update)
            s.tokens = probe_pass(model)["tokens"][-1]
            if on_done is not None:
                on_done(s)
    return count


def time_settings(model: nn.Module, settings: list[Setting], images: torch.Tensor, warmup: int, rounds: int,
                  what: str = "images/s") -> Load:
    """Images/s of every setting, timed in `rounds` interleaved rounds on the same images, its rounds'
    spread and its speed-up's marks; returns the machine's load around the timing. `what` names the
    phase in its progress."""
    reducers = [create_reducer(s.reducer, **s.params) for s in settings]
    before = load_average()
    with Progress(what, len(settings) * (rounds + 1), "timings") as shown:  # a warm-up, then the rounds
        timed = interleaved_times(model, reducers, images, warmup, rounds, shown.update)
    for setting, times in zip(settings, timed, strict=True):
        setting.times += times
    load = Load.since(before)
    for setting in settings:  # the baseline comes first, so its images/s is there for the others
        setting.images_per_s = images_per_second(len(images), setting.times)
        setting.speedup = setting.images_per_s / settings[0].images_per_s
        setting.spread = spread(setting.times)
        # a speed-up is as doubtful as the less steady of its two timings
        setting.marks = union_marks(timing_marks({"spread": setting.spread, **load.as_record()}),
                                    timing_marks({"spread": settings[0].spread, **load.as_record()}))
    return load


def format_params(params: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items()) or "-"


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


# top-1 and its change from the baseline are fractions (0.9012, -0.0123), as in the CSV and the records
TABLE_HEAD = ("| reducer | params | MAC fraction | top-1 | change | images/s vs baseline | tokens out |\n"
              "|---|---|---:|---:|---:|---:|---:|")


def table_row(s: Setting, base_top1: float) -> str:
    """One setting's row of the table; its speed-up is "-" until it is timed."""
    change = "-" if s.reducer == "none" else f"{s.top1 - base_top1:+.4f}"
    speed = "-" if s.speedup is None else f"{s.speedup:.2f}x {s.marks}".rstrip()
    return (f"| {s.reducer} | {format_params(s.params)} | {s.mac_fraction:.3f} | {s.top1:.4f} | {change} | {speed} | "
            f"{s.tokens} |")


def markdown_table(settings: list[Setting]) -> str:
    """The table, then the legend of its timing marks."""
    lines = [TABLE_HEAD, *(table_row(s, settings[0].top1) for s in settings)]
    return "\n".join(lines) + f"\n\nTiming marks: {TIMING_LEGEND}."


def rows(settings: list[Setting]) -> list[dict]:
    """One dict per setting with the CSV's columns (params as a dict)."""
    return [{"reducer": s.reducer, "params": s.params, "mac_fraction": s.mac_fraction, "top1": s.top1,
             "speedup": s.speedup, "tokens": s.tokens, "spread": s.spread, "marks": s.marks} for s in settings]


def csv_text(settings: list[Setting]) -> str:
    return csv_table(rows(settings), CSV_COLUMNS)


def run_compare(cfg: DictConfig, settings_cfg: CompareSettings, output_dir: Path, model: nn.Module, datamodule,
                weights: str, model_name: str, adapter_options: dict | None = None) -> list[Setting]:
    """Measure and write the comparison; `model` is unreduced and `datamodule` bound to it;
    `adapter_options` are the model family's options for every setting."""
    started = time.perf_counter()
    mcfg = plain(cfg.measure)
    dtype, _, device = check_measure(mcfg["batch_size"], mcfg["dtype"], mcfg["autocast"], mcfg["device"],
                                     mcfg["warmup"], mcfg["repeats"])
    model = model.to(device=device, dtype=dtype).eval()
    tokenreduce.apply(model, "none", adapter_options=adapter_options)  # the options stay with every reducer
    changed_options = model._tokenreduce.changed_options()
    stage = "test" if cfg.eval_split == "test" else "validate"
    datamodule.setup(stage)
    loader = datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()

    settings = [Setting("none", {}, None)]
    targets = [(name, fixed, fraction) for name, fixed in settings_cfg.reducers.items()
               for fraction in settings_cfg.mac_fractions]
    for name, fixed, fraction in progress(targets, "compare, matching MACs", unit="settings",
                                          note=lambda target: f"{target[0]} at {target[2]:g}"):
        params, reached = match_macs(model, name, fraction, tolerance=settings_cfg.tolerance, **fixed)
        settings.append(Setting(name, params, fraction, mac_fraction=reached))
    show(f"compare: top-1 of {len(settings)} settings on the {cfg.eval_split} split"
         f"{'' if settings_cfg.images is None else f' (its first {settings_cfg.images} images)'}, each row as it "
         f"finishes; then images/s of all, timed in {mcfg['repeats']} interleaved rounds\n\n{TABLE_HEAD}")
    count = top1_of_each(model, loader, settings, settings_cfg.images, "compare, top-1",
                         on_done=lambda s: show(table_row(s, settings[0].top1)))
    input_size = tuple(model_data_config(model)["input_size"])
    generator = torch.Generator().manual_seed(cfg.seed)
    timing_images = torch.randn(mcfg["batch_size"], *input_size, generator=generator).to(device=device, dtype=dtype)
    load = time_settings(model, settings, timing_images, warmup=mcfg["warmup"], rounds=mcfg["repeats"],
                         what="compare, images/s")

    protocol = {
        "model": model_name, "weights": weights, "dataset": datamodule.describe(), "split": cfg.eval_split,
        "images": count, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "threads": torch.get_num_threads(), "timing_batch": mcfg["batch_size"], "timing_rounds": mcfg["repeats"],
        "seed": cfg.seed, "adapter_options": changed_options, "load": load.as_record(),
    }
    where = f" in {protocol['dataset']['root']}" if protocol["dataset"].get("root") else ""
    header = (f"{model_name} ({weights}) on {count} {protocol['dataset'].get('name', '')} {cfg.eval_split} images"
              f"{where}; images/s measured at batch {mcfg['batch_size']}, {protocol['dtype']}, {device}, "
              f"{protocol['threads']} threads, {mcfg['repeats']} interleaved rounds; {load.words()}")
    _write_outputs(output_dir, header, settings, protocol, settings_cfg, model, loader)
    tokenreduce.remove(model)
    elapsed = time.perf_counter() - started
    write_new(output_dir / COMPARISON_JSON, json.dumps({
        "protocol": protocol, "seconds": round(elapsed, 1),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "rows": [{**row, "target": s.target, "images_per_s": s.images_per_s} for row, s in zip(rows(settings), settings,
                                                                                              strict=True)],
    }, indent=2) + "\n")
    show(f"\n{header}\n\n{markdown_table(settings)}\n\n{len(settings)} settings in {elapsed:.0f} s")
    show(f"results: {output_dir}")
    return settings


def _write_outputs(output_dir: Path, header: str, settings, protocol, settings_cfg, model, loader) -> None:
    from tokenreduce import viz

    output_dir.mkdir(parents=True, exist_ok=True)
    write_new(output_dir / TABLE_MD, f"{header}\n\n{markdown_table(settings)}\n")
    write_new(output_dir / TABLE_CSV, csv_text(settings))
    plot_rows = rows(settings)
    title = f"{protocol['model']}, {protocol['images']} {protocol['dataset'].get('name', '')} images"
    viz.plot_tradeoff(plot_rows, "mac_fraction", output_dir / PLOT_MACS, title=title)
    viz.plot_tradeoff(plot_rows, "speedup", output_dir / PLOT_SPEED, title=title)
    if settings_cfg.merge_maps:
        images = next(iter(loader))[0][: settings_cfg.merge_maps]
        chosen = {f"{s.reducer}": (s.reducer, s.params) for s in settings
                  if s.target is not None and math.isclose(s.target, settings_cfg.merge_map_fraction)}
        figure = viz.merge_maps(model, images, chosen)
        save_figure(figure, output_dir / MERGE_MAPS, dpi=110, bbox_inches="tight")
