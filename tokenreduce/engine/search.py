"""`task=search`: the per-layer schedule with the best calibration score within a cost budget,
written as a reducer config that `reducer=<file>` loads.

    python -m tokenreduce experiment=search_fmnist budget.macs=0.5
    python -m tokenreduce experiment=search_fmnist search.reducer=compose search.methods=[tome,zerotprune]
    python -m tokenreduce experiment=search_fmnist search.resume=outputs/runs/.../   # continue a search

Calibration images are the first `search.images` of the validation split; the searched schedule,
the best uniform one and the unreduced model are then measured side by side on the evaluation
split (`eval_split`), which the search never saw.
"""

from __future__ import annotations

import datetime
import json
import pickle
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig
from torch import nn

import tokenreduce
from tokenreduce.cost import probe_pass
from tokenreduce.data.transforms import model_data_config
from tokenreduce.engine.callbacks import STOP_SIGNALS, RunInterrupted
from tokenreduce.engine.compare import Setting, format_params, time_settings, top1_of_each
from tokenreduce.engine.config import plain, settings_of
from tokenreduce.engine.console import Progress, show, tell
from tokenreduce.engine.record import (
    DIFFRATE_STATE,
    SEARCH_JSON,
    SEARCH_STATE,
    SEARCH_TABLE,
    SEARCHED_REDUCER,
    staged_file,
    write_new,
)
from tokenreduce.engine.speed import check_measure, images_per_second, time_forward
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.reducers.base import reducer_class
from tokenreduce.search.schedule import (
    OBJECTIVES,
    WINDOW,
    Candidate,
    Evaluator,
    ScheduleSearch,
    ScheduleSpace,
    Score,
    SearchState,
    check_fingerprint,
)

DIFFRATE_OPTIONS = ("lr", "flops_weight", "granularity")  # diffrate_search's own settings
TORCH_LOAD_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


@dataclass
class SearchSettings:
    """The `search` config node (conf/config.yaml documents each key)."""

    reducer: str = "tome"
    methods: list[str] | None = None
    fixed: dict = field(default_factory=dict)
    layers: list[int] | None = None
    steps: int = 60
    images: int = 2000
    objective: str = "auto"
    batch_size: int = 256
    resume: str | None = None
    test_images: int | None = None
    diffrate: dict = field(default_factory=dict)

    def __post_init__(self):
        reducer_class(self.reducer)  # an unknown name is a ConfigError listing the registered ones
        if self.reducer == "diffrate":
            if self.methods not in (None, ["diffrate"]) or self.fixed or self.layers is not None:
                raise ConfigError("search.reducer=diffrate searches its own prune and merge counts in every layer "
                                  "but the first; allowed: search.methods, search.fixed and search.layers unset, "
                                  f"and its settings in search.diffrate ({', '.join(DIFFRATE_OPTIONS)})")
        elif self.diffrate:
            raise ConfigError(f"search.diffrate={self.diffrate} is only used with search.reducer=diffrate; allowed: {{}}")
        if self.reducer == "compose":
            if not self.methods or not isinstance(self.methods, list):
                raise ConfigError(f"search.methods={self.methods!r} is invalid with search.reducer=compose; allowed: "
                                  "a list of reducers to choose from per layer, e.g. [tome, zerotprune]")
        elif self.methods not in (None, [self.reducer]):
            raise ConfigError(f"search.methods={self.methods!r} is only used with search.reducer=compose; allowed: "
                              "null")
        self.methods = list(self.methods) if self.reducer == "compose" else [self.reducer]
        if self.reducer != "diffrate":  # an unsearchable method fails now, before any compute
            ScheduleSpace.check(self.reducer, self.methods, self.fixed)
        self.fixed = {name: dict(params or {}) for name, params in (self.fixed or {}).items()}
        check_number("search", "steps", self.steps, low=0, integer=True)
        check_number("search", "images", self.images, low=1, integer=True)
        check_number("search", "batch_size", self.batch_size, low=1, integer=True)
        if self.test_images is not None:
            check_number("search", "test_images", self.test_images, low=0, integer=True)
        if self.objective not in ("auto", *OBJECTIVES):
            raise ConfigError(f"search.objective={self.objective!r} is invalid; allowed: auto, {', '.join(OBJECTIVES)}")
        self.diffrate = dict(self.diffrate or {})
        unknown = sorted(set(self.diffrate) - set(DIFFRATE_OPTIONS))
        if unknown:
            raise ConfigError(f"search.diffrate.{unknown[0]} is not a setting; allowed: {', '.join(DIFFRATE_OPTIONS)}")
        self.diffrate_state = None  # what `resume` names for DiffRate's search (not a setting)
        if self.resume is not None:
            state_file = DIFFRATE_STATE if self.reducer == "diffrate" else SEARCH_STATE
            path = Path(self.resume)
            path = path / state_file if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"search.resume={self.resume}: no {state_file} there; allowed: the run directory "
                                  "of an earlier search, or its state file")
            self.resume = str(path)
            if self.reducer == "diffrate":  # read now, so that a refused file fails before any compute
                self.diffrate_state = _load_state(self.resume)


@dataclass
class Budget:
    """The `budget` config node: exactly one of a MAC fraction or images/s on this device."""

    macs: float | None = None
    images_per_s: float | None = None

    def __post_init__(self):
        if (self.macs is None) == (self.images_per_s is None):
            raise ConfigError(f"budget: macs={self.macs!r}, images_per_s={self.images_per_s!r}; allowed: exactly one "
                              "of budget.macs (a fraction of the unreduced MACs in (0, 1]) or budget.images_per_s")
        if self.macs is not None:
            check_number("budget", "macs", self.macs, low=0, high=1, low_open=True)
        else:
            check_number("budget", "images_per_s", self.images_per_s, low=0, low_open=True)


def settings_from(cfg: DictConfig) -> tuple[SearchSettings, Budget]:
    settings = settings_of(SearchSettings, cfg.get("search"), "search")
    budget = settings_of(Budget, cfg.get("budget"), "budget")
    if settings.reducer == "diffrate" and budget.macs is None:
        raise ConfigError("budget.images_per_s with search.reducer=diffrate: DiffRate's search targets MACs; "
                          "allowed: budget.macs")
    return settings, budget


def calibration_set(datamodule, count: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` images (and labels) of the validation split, in memory."""
    datamodule.setup("validate")
    images, labels, total = [], [], 0
    for batch in datamodule.val_dataloader():
        x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        take = min(len(x), count - total)
        images.append(x[:take])
        labels.append(None if y is None else y[:take])
        total += take
        if total >= count:
            break
    labelled = all(y is not None for y in labels)
    return (torch.cat(images).to(device=device, dtype=dtype),
            torch.cat(labels).to(device) if labelled else None)


def _speed(model: nn.Module, images: torch.Tensor, name: str, params: dict, warmup: int, repeats: int) -> float:
    tokenreduce.apply(model, name, **params)
    times = time_forward(model, images, repeats=repeats, warmup=warmup)
    tokenreduce.apply(model, "none")
    return images_per_second(len(images), times)


def mac_budget_for_speed(search: ScheduleSearch, model: nn.Module, images: torch.Tensor, images_per_s: float,
                         warmup: int, repeats: int) -> tuple[float, list[dict]]:
    """The MAC fraction of the weakest uniform schedule of the (first) method that reaches
    `images_per_s` here, measured; and the measurements, for the record."""
    method, space = search.space.methods[0], search.space
    measured = []

    def speed(r: int) -> float:
        candidate = space.uniform(method, r)
        value = _speed(model, images, *space.config(candidate), warmup, repeats)
        measured.append({"r": r, "images_per_s": round(value, 1), "mac_fraction": round(search.macs(candidate), 4)})
        show(f"  uniform r={r}: {value:.1f} images/s, MAC fraction {search.macs(candidate):.3f}")
        return value

    if speed(0) >= images_per_s:
        return 1.0, measured
    lo, hi = 1, space.num_patches // 2  # bisect for the smallest r that is fast enough
    if speed(hi) < images_per_s:
        raise ConfigError(f"budget.images_per_s={images_per_s:g} is out of reach: {method} with r={hi} in every layer "
                          f"runs at {measured[-1]['images_per_s']} images/s here; allowed: a lower budget")
    while lo < hi:
        mid = (lo + hi) // 2
        if speed(mid) >= images_per_s:
            hi = mid
        else:
            lo = mid + 1
    return search.macs(space.uniform(method, lo)), measured


def _save_state(path: Path, state: str | dict) -> None:
    """Write a search state (JSON text, or a dict for torch.save) so that a crash mid-write never
    leaves half a state."""
    with staged_file(path, replace=True) as temporary:
        if isinstance(state, str):
            temporary.write_text(state)
        else:
            torch.save(state, temporary)


def _progress(state: SearchState, objective: str) -> str:
    """What the search's latest step did and its best score so far (the start, before any step)."""
    best = state.scores[state.best]
    value = {"accuracy": f"calibration top-1 {best['top1'] or 0:.4f}",
             "loss": f"calibration loss {best['loss'] or 0:.4f} (top-1 {best['top1'] or 0:.4f})",
             "embedding": f"embedding cosine {best['cosine']:.4f}"}[objective]
    if not state.history:
        return f"start {Candidate.from_key(state.best).r}, MAC fraction {best['mac_fraction']:.4f}, {value}"
    last = state.history[-1]
    tried = "no unscored neighbour left" if last["key"] is None else (
        f"tried {Candidate.from_key(last['key']).r}{' (accepted)' if last['accepted'] else ''}")
    return f"{tried}; best {value}"


def searched_config(name: str, params: dict) -> dict:
    return {"name": name, **params}


@dataclass
class Found:
    """What a strategy found: the searched and best uniform reducer configs with their calibration
    scores, and how much it searched."""

    searched: tuple[str, dict]
    uniform: tuple[str, dict]
    searched_score: dict
    uniform_score: dict
    steps: int
    evaluated: int
    details: dict = field(default_factory=dict)
    start: tuple[str, dict] | None = None  # the uniform schedule brought into the budget window
    start_score: dict | None = None


class Context:
    """What both strategies share: the calibration set, its evaluator, the model's geometry."""

    def __init__(self, cfg, settings: SearchSettings, output_dir: Path, model: nn.Module, datamodule,
                 adapter_options, fingerprint: dict):
        mcfg = plain(cfg.measure)
        self.mcfg, self.settings, self.seed, self.output_dir = mcfg, settings, cfg.seed, output_dir
        self.dtype, _, self.device = check_measure(mcfg["batch_size"], mcfg["dtype"], mcfg["autocast"],
                                                   mcfg["device"], mcfg["warmup"], mcfg["repeats"])
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.images, self.labels = calibration_set(datamodule, settings.images, self.device, self.dtype)
        self.objective = settings.objective if settings.objective != "auto" else (
            "accuracy" if self.labels is not None else "embedding")
        self.evaluator = Evaluator(model, self.images, self.labels, settings.batch_size, adapter_options)
        self.info = model._tokenreduce.info
        self.num_patches = probe_pass(model)["tokens"][0] - self.info.num_prefix
        input_size = tuple(model_data_config(model)["input_size"])
        self.timing_images = torch.randn(mcfg["batch_size"], *input_size,
                                         generator=torch.Generator().manual_seed(cfg.seed)).to(self.device, self.dtype)
        self.fingerprint = fingerprint

    def stop_if_asked(self, path: Path, step: int) -> None:
        """After a step's state is saved: end the search if SIGINT or SIGTERM arrived during it."""
        if self.signals.received is not None:
            tell(f"\nsearch stopped by {self.signals.received} after step {step}; its state is in {path}; "
                 f"continue with the same command and search.resume={self.output_dir}")
            raise RunInterrupted(self.signals.received, str(path), step)


class StopSignals:
    """While searching, SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) ends the search after the
    step under way, once its state is saved; a second Ctrl-C stops at once."""

    def __init__(self):
        self.received: str | None = None
        self._handlers: dict = {}

    def _note(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._handlers = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        return False


def schedule_strategy(ctx: Context, budget: Budget) -> tuple[float, Found]:
    """The hill-climbing schedule search (tokenreduce.search.schedule)."""
    settings = ctx.settings
    saved = SearchState.from_json(Path(settings.resume).read_text()) if settings.resume else None
    space = ScheduleSpace(settings.reducer, settings.methods, settings.fixed, ctx.info.depth, ctx.num_patches,
                          settings.layers)
    speed_calibration = []
    if budget.macs is not None:
        mac_budget = budget.macs
    elif saved is not None:  # a resumed speed search keeps the MAC budget its measurements gave
        mac_budget = saved.fingerprint["budget"]
    else:
        show(f"search: finding the MAC fraction that runs at {budget.images_per_s:g} images/s on {ctx.device}")
        probe = ScheduleSearch(space, ctx.evaluator, 1.0, ctx.objective, ctx.seed)
        mac_budget, speed_calibration = mac_budget_for_speed(probe, ctx.model, ctx.timing_images,
                                                             budget.images_per_s, ctx.mcfg["warmup"],
                                                             ctx.mcfg["repeats"])
    search = ScheduleSearch(space, ctx.evaluator, mac_budget, ctx.objective, ctx.seed, ctx.fingerprint)
    state_path = ctx.output_dir / SEARCH_STATE

    steps: list[Progress] = []  # the progress of the steps, from the first step on

    def on_step(state: SearchState) -> None:
        _save_state(state_path, state.to_json())
        if not state.history:
            show(f"search: {_progress(state, ctx.objective)}")
        else:
            if not steps:
                steps.append(Progress("search", settings.steps, "steps", done=state.step - 1))
            steps[0].update(state.step - steps[0].done, _progress(state, ctx.objective))
        ctx.stop_if_asked(state_path, state.step)

    if saved is not None:
        show(f"search: resuming {settings.resume} at step {saved.step} of {settings.steps}")
    else:
        show(f"search: scoring the uniform {'/'.join(space.methods)} schedules within MAC fraction {mac_budget:.4f} "
             f"on {len(ctx.images)} calibration images, to start from the best")
    try:
        state = search.run(settings.steps, saved, on_step)
    finally:
        for shown in steps:
            shown.close()
    if saved is not None and saved.step >= settings.steps:
        _save_state(state_path, state.to_json())
    best = Candidate.from_key(state.best)
    uniform_method, uniform_entry = max(state.uniform.items(),
                                        key=lambda item: Score(**state.scores[item[1]["key"]]).rank(ctx.objective))
    uniform = space.uniform_config(uniform_method, {k: v for k, v in uniform_entry.items() if k != "key"})
    return mac_budget, Found(
        searched=space.config(best), uniform=uniform, searched_score=state.scores[state.best],
        uniform_score=state.scores[uniform_entry["key"]], steps=state.step, evaluated=len(state.scores),
        details={"r": list(best.r), "methods": list(best.methods), "speed_calibration": speed_calibration},
        **({} if state.start == uniform_entry["key"] else {
            "start": space.config(Candidate.from_key(state.start)), "start_score": state.scores[state.start]}))


def diffrate_strategy(ctx: Context, budget: Budget) -> tuple[float, Found]:
    """DiffRate's differentiable search of per-layer prune and merge counts (tokenreduce.search.diffrate)."""
    from tokenreduce.search.diffrate import diffrate_search

    settings = ctx.settings
    options = dict(settings.diffrate)
    state_path = ctx.output_dir / DIFFRATE_STATE
    saved = settings.diffrate_state
    if saved is not None:
        check_fingerprint(saved.get("fingerprint", {}), ctx.fingerprint)
        show(f"search: resuming {settings.resume} at step {saved['step']} of {settings.steps}")

    def on_step(state: dict) -> None:
        _save_state(state_path, {**state, "fingerprint": ctx.fingerprint})
        last = state["history"][-1]
        shown.update(last["step"] - shown.done, f"loss {last['loss']:.4f}, task loss {last['task_loss']:.4f}, "
                                                f"expected MAC fraction {last['mac_fraction']:.4f}")
        ctx.stop_if_asked(state_path, last["step"])

    tokenreduce.remove(ctx.model)  # the search drives the plain model's blocks
    try:
        with Progress("search (diffrate)", settings.steps, "steps",
                      done=min(saved["step"] if saved else 0, settings.steps)) as shown:
            found = diffrate_search(ctx.model, ctx.images, ctx.labels, budget.macs, steps=settings.steps,
                                    batch_size=settings.batch_size, seed=ctx.seed, state=saved, on_step=on_step,
                                    **options)
    finally:
        tokenreduce.apply(ctx.model, "none", adapter_options=ctx.evaluator.adapter_options)
    searched = ("diffrate", {"prune": found["prune"], "merge": found["merge"]})
    uniform = uniform_merge(ctx, budget.macs)
    return budget.macs, Found(
        searched=searched, uniform=uniform, searched_score=asdict(ctx.evaluator.score(*searched)),
        uniform_score=asdict(ctx.evaluator.score(*uniform)), steps=len(found["history"]), evaluated=1,
        details={"argmax": found["argmax"], "final_expected_mac_fraction": found["history"][-1]["mac_fraction"]
                 if found["history"] else None})


def _load_state(path: str) -> dict:
    """A DiffRate search state as `_save_state` wrote it. Only tensors and plain values are read: a
    file whose unpickling would build other objects (and so could run code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch wraps the reason in advice to load with weights_only=False, which is what must not happen
        detail = [line for line in lines if not line.startswith(TORCH_LOAD_ADVICE)] or lines or [type(err).__name__]
        raise ConfigError(f"search.resume={path} is refused: torch.load(weights_only=True), which reads only "
                          f"tensors and plain values, rejects it ({detail[0]}); allowed: the {DIFFRATE_STATE} of "
                          "an earlier DiffRate search") from None


def uniform_merge(ctx: Context, budget: float) -> tuple[str, dict]:
    """DiffRate's uniform counterpart: the same merge count in every layer but the first (which
    DiffRate never reduces), the weakest one within the budget."""
    depth = ctx.info.depth
    for r in range(ctx.num_patches + 1):
        params = {"prune": 0, "merge": [0] + [r] * (depth - 1)}
        if ctx.evaluator.mac_fraction("diffrate", params) <= budget + 1e-12:
            return "diffrate", params
    raise ConfigError(f"search: no uniform diffrate schedule reaches budget {budget:g}; allowed: a larger budget")


def run_search(cfg: DictConfig, settings: SearchSettings, budget: Budget, output_dir: Path, model: nn.Module,
               datamodule, weights: str, model_name: str, adapter_options: dict | None = None,
               evaluate_with: str = "python -m tokenreduce task=evaluate") -> dict:
    """Search, evaluate on the held-out split, and write the reducer config and the report.
    `evaluate_with`: the command, less its reducer, that evaluates on the search's model and data."""
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model": model_name, "weights": weights, "dataset": datamodule.describe(),
                   "budget_images_per_s": budget.images_per_s}
    ctx = Context(cfg, settings, output_dir, model, datamodule, adapter_options, fingerprint)
    strategy = diffrate_strategy if settings.reducer == "diffrate" else schedule_strategy
    with StopSignals() as ctx.signals:
        mac_budget, found = strategy(ctx, budget)
    rows = {"unreduced": Setting("none", {}, None), "best uniform": Setting(*found.uniform, mac_budget)}
    if found.start is not None:
        rows["uniform in the window"] = Setting(*found.start, mac_budget)
    rows["searched"] = Setting(*found.searched, mac_budget)
    held_out = _held_out(cfg, settings, datamodule, ctx.model, rows, ctx.timing_images, ctx.mcfg)
    result = {
        "model": model_name, "weights": weights, "dataset": datamodule.describe(), "device": str(ctx.device),
        "budget": asdict(budget), "mac_budget": mac_budget, "window": WINDOW, "objective": ctx.objective,
        "calibration_images": len(ctx.images), "seed": cfg.seed, "steps": found.steps,
        "evaluated_schedules": found.evaluated, "speed_calibration": found.details.pop("speed_calibration", []),
        "searched": {"reducer": searched_config(*found.searched), "calibration": found.searched_score,
                     **found.details},
        "uniform": {"reducer": searched_config(*found.uniform), "calibration": found.uniform_score},
        "start": None if found.start is None else {"reducer": searched_config(*found.start),
                                                   "calibration": found.start_score},
        "held_out": held_out, "seconds": round(time.perf_counter() - started, 1),
        "evaluate_command": f"{evaluate_with} reducer={(output_dir / SEARCHED_REDUCER).resolve()}",
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    _write_outputs(output_dir, result)
    return result


def _held_out(cfg, settings: SearchSettings, datamodule, model, labelled: dict[str, Setting], timing_images,
              mcfg) -> dict:
    """Top-1 on the evaluation split and images/s (interleaved) of the unreduced model, the best
    uniform schedule (also as brought into the budget window, where that differs) and the searched one."""
    rows = list(labelled.values())
    if settings.test_images == 0:
        return {}
    stage = "test" if cfg.eval_split == "test" else "validate"
    datamodule.setup(stage)
    loader = datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()
    count = top1_of_each(model, loader, rows, settings.test_images, "search, held-out top-1",
                         on_done=lambda row: setattr(row, "mac_fraction", probe_pass(model)["macs"]))
    base = rows[0].mac_fraction
    for row in rows:
        row.mac_fraction /= base
    time_settings(model, rows, timing_images, warmup=mcfg["warmup"], rounds=mcfg["repeats"],
                  what="search, held-out images/s")
    tokenreduce.apply(model, "none")
    return {"split": cfg.eval_split, "images": count, "timing_batch": len(timing_images),
            "rows": [{"schedule": label, "reducer": row.reducer, "params": row.params, "top1": row.top1,
                      "mac_fraction": row.mac_fraction, "images_per_s": row.images_per_s, "speedup": row.speedup,
                      "tokens_out": row.tokens}
                     for label, row in labelled.items()]}


def markdown(result: dict) -> str:
    held = result["held_out"]
    budget = result["budget"]
    asked = (f"MAC fraction {budget['macs']:g}" if budget["macs"] is not None
             else f"{budget['images_per_s']:g} images/s on {result['device']} (MAC fraction "
                  f"{result['mac_budget']:.4f})")
    lines = [f"{result['model']} ({result['weights']}), budget: {asked}; {result['objective']} on "
             f"{result['calibration_images']} calibration images, {result['steps']} steps, "
             f"{result['evaluated_schedules']} schedules scored, seed {result['seed']}", ""]
    calibration = {"best uniform": result["uniform"]["calibration"], "searched": result["searched"]["calibration"],
                   "uniform in the window": (result["start"] or {}).get("calibration")}
    # top-1 as a fraction (0.9012), as in search.json
    lines += ["| schedule | reducer | params | MAC fraction | calibration top-1 | calibration cosine | "
              f"held-out top-1 ({held.get('images', 0)} {held.get('split', '-')} images) | images/s vs unreduced |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in held.get("rows", []):
        cal = calibration.get(row["schedule"])
        cal_top1 = "-" if cal is None or cal["top1"] is None else f"{cal['top1']:.4f}"
        cal_cos = "-" if cal is None else f"{cal['cosine']:.4f}"
        lines.append(f"| {row['schedule']} | {row['reducer']} | {format_params(row['params'])} | "
                     f"{row['mac_fraction']:.4f} | {cal_top1} | {cal_cos} | {row['top1']:.4f} | "
                     f"{row['speedup']:.2f}x |")
    return "\n".join(lines)


def _write_outputs(output_dir: Path, result: dict) -> None:
    reducer = result["searched"]["reducer"]
    header = (f"# Searched by `python -m tokenreduce task=search` for {result['model']}: budget "
              f"{json.dumps(result['budget'])}, {result['objective']} on {result['calibration_images']} calibration "
              f"images, seed {result['seed']}.\n# Evaluate it with: {result['evaluate_command']}\n")
    write_new(output_dir / SEARCHED_REDUCER, header + yaml.safe_dump(reducer, sort_keys=False,
                                                                       default_flow_style=None))
    write_new(output_dir / SEARCH_JSON, json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    write_new(output_dir / SEARCH_TABLE, table + "\n")
    show("\n" + table)
    show(f"\nsearched reducer config: {output_dir / SEARCHED_REDUCER} ({result['seconds']:.0f} s)")
    show(f"evaluate it with: {result['evaluate_command']}")
