"""One run of `python -m tokenreduce`: evaluate a reduced model off the shelf, or fine-tune it.

Everything that can be wrong in the configuration is checked before any model is built or any
weight downloaded: the task, the reducer and its parameters, the optimisation and loss settings,
the dataset folders, the checkpoint to resume from, and the run directory.
"""

from __future__ import annotations

import datetime
import importlib
import os
import shlex
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import timm
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

import tokenreduce
from tokenreduce import models
from tokenreduce.cost import probe_pass
from tokenreduce.data.transforms import model_data_config
from tokenreduce.engine import search as search_task
from tokenreduce.engine.callbacks import LatestCheckpoint, RunInterrupted, build_callbacks
from tokenreduce.engine.compare import run_compare, settings_from
from tokenreduce.engine.config import (
    HF_TASKS,
    build_reducer,
    check_settings_used,
    check_task,
    default_run_name,
    plain,
    reducer_spec,
    top_key,
)
from tokenreduce.engine.console import tell
from tokenreduce.engine.hf_tasks import check_hf_task, run_task
from tokenreduce.engine.loggers import build_loggers, check_loggers, finish_loggers
from tokenreduce.engine.module import (
    REDUCER_LOSS_PREFIX,
    LossSettings,
    OptimSettings,
    ReductionModule,
    logged_metrics,
)
from tokenreduce.engine.record import RunRecord, ensure_fresh, hold_run_directory
from tokenreduce.engine.speed import check_measure, measure
from tokenreduce.engine.weights import check_fits, load_backbone, read_checkpoint
from tokenreduce.errors import ConfigError

STAGES = {"evaluate": "validate", "finetune": "fit", "compare": "validate", "search": "validate"}
MEASURE_KEYS = ("enabled", "batch_size", "dtype", "autocast", "device", "warmup", "repeats")
MODEL_KEYS = ("name", "pretrained", "checkpoint", "img_size", "num_classes", "drop_path_rate", "kwargs",
              "adapter_options")


# --- building the pieces -----------------------------------------------------------------------
def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """The model of the `model` config: an offline model (`tokenreduce.models`) or a timm model,
    with pretrained weights from its source, the hub or a local file."""
    cfg = plain(model_cfg)
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a model setting; allowed: {', '.join(MODEL_KEYS)}")
    name = cfg.get("name")
    if not isinstance(name, str) or not models.is_model(name):
        raise ConfigError(f"model.name={name!r} is not a model; allowed: an offline model "
                          f"({', '.join(models.available())}) or a timm model (timm.list_models())")
    kwargs = dict(cfg.get("kwargs") or {})
    for key in ("img_size", "num_classes"):
        if cfg.get(key) is not None:
            kwargs[key] = cfg[key]
    if cfg.get("drop_path_rate"):
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return models.create_model(name, pretrained=bool(cfg.get("pretrained")), checkpoint=cfg.get("checkpoint"),
                               **kwargs)


def weights_label(model_cfg: dict, model: nn.Module, ckpt_path: str | None = None) -> str:
    """Where the weights come from: a Lightning checkpoint (`ckpt_path`), a file, a source, or none."""
    if ckpt_path:
        return f"checkpoint:{Path(ckpt_path).resolve()}"
    if model_cfg.get("checkpoint"):
        return f"file:{model_cfg['checkpoint']}"
    if not model_cfg.get("pretrained"):
        return "random"
    if model_cfg["name"] in models.available():
        return f"offline:{model_cfg['name']}"
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    tag = cfg.get("tag")
    return f"timm:{cfg.get('architecture', model_cfg['name'])}" + (f".{tag}" if tag else "")


def resolve_precision(precision, accelerator) -> str | int:
    """"auto": bf16 mixed precision on a GPU that supports it, fp16 mixed on other GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def build_trainer(trainer_cfg: DictConfig | dict, loggers: list, callbacks: list, output_dir: Path,
                  checkpointing: bool) -> L.Trainer:
    kwargs = plain(trainer_cfg)
    kwargs["precision"] = resolve_precision(kwargs.get("precision", "auto"), kwargs.get("accelerator", "auto"))
    try:
        return L.Trainer(default_root_dir=str(output_dir), logger=loggers or False, callbacks=callbacks,
                         enable_checkpointing=checkpointing, **kwargs)
    except TypeError as err:
        raise ConfigError(f"trainer: {err}; the trainer config takes lightning.Trainer arguments") from None
    except MisconfigurationException as err:
        raise ConfigError(f"trainer: {err}") from None


def _settings(cls, cfg_node, key: str):
    values = plain(cfg_node) or {}
    allowed = list(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a setting; allowed: {', '.join(allowed)}")
    return cls(**values)


def import_plugins(modules: list[str]) -> None:
    """Import the modules listed in `imports`, e.g. one that registers a reducer of your own."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ConfigError(f"imports: cannot import {name!r} ({err}); list modules importable from this "
                              "environment") from None


def build_datamodule(data_cfg: DictConfig):
    """The `data` config's data module; a ConfigError its constructor raises comes out as itself,
    not wrapped in Hydra's "Error in call to target"."""
    try:
        return instantiate(data_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"data: {' '.join(str(err).split())}") from None


def check_training_length(trainer_cfg: dict) -> None:
    """A fine-tune's learning-rate schedule spans its whole length, which must be finite."""
    epochs, steps = trainer_cfg.get("max_epochs"), trainer_cfg.get("max_steps")
    if steps not in (None, -1):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"trainer.max_steps={steps!r} is invalid; allowed: an integer >= 1, or -1 (no limit "
                              "by steps)")
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs!r} is invalid for task=finetune; allowed: an integer >= 1 "
                          "(the learning-rate schedule needs a finite length), or a trainer.max_steps >= 1")


def check_monitor(checkpoint_cfg: dict, num_classes: int | None = None) -> None:
    """`checkpoint.monitor` must be a metric a fine-tune logs, and `checkpoint.mode` min or max."""
    monitor, mode = checkpoint_cfg.get("monitor"), checkpoint_cfg.get("mode")
    allowed = logged_metrics(num_classes)
    if monitor is not None and monitor not in allowed and not str(monitor).startswith(REDUCER_LOSS_PREFIX):
        raise ConfigError(f"checkpoint.monitor={monitor!r} is not a metric the fine-tune logs; allowed: "
                          f"{', '.join(allowed)}, a reducer's {REDUCER_LOSS_PREFIX}<term>, or null (keep the latest)")
    if mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r} is invalid; allowed: min, max")


def evaluate_command(overrides: list[str] | None) -> str:
    """The start of the command that evaluates a searched reducer on the search's own model and data:
    the search's settings less its own, with task=evaluate."""
    if overrides is None:  # run in-process without its command line
        return "python -m tokenreduce <the search's model and data settings> task=evaluate"
    own = ("task", "search", "budget", "reducer", "compare", "hydra")
    kept = [o for o in overrides if top_key(o) not in own]
    return " ".join(["python -m tokenreduce", *map(shlex.quote, kept), "task=evaluate"])


def launched_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed launch (or not distributed at all)."""
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def _metric(results: list[dict], key: str) -> float | None:
    for result in results:
        if key in result:
            return float(result[key])
    return None


def _versions() -> dict:
    return {"tokenreduce": tokenreduce.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "lightning": L.__version__}


# --- the run -----------------------------------------------------------------------------------
def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None = None) -> RunRecord | None:
    """Run the configured task, writing into `output_dir`; the record on rank 0, None elsewhere.

    `overrides` are the command line's (Hydra's) settings, from which an interrupted fine-tune's
    resume command is built. A fine-tune stopped by SIGINT or SIGTERM writes an "interrupted" record
    and raises `RunInterrupted`; a failure after the evaluation writes a "failed" record keeping the
    metrics measured before it, then raises. A second run into a directory that a run holds is
    refused (`hold_run_directory`; rank 0 holds it for every rank).
    """
    with hold_run_directory(output_dir) if launched_rank_zero() else nullcontext():
        return _run(cfg, output_dir, overrides)


@dataclass
class Prepared:
    """What a run checked and parsed from its configuration before any compute."""

    task: str
    reducer: object = None
    reducer_name: str = "none"
    reducer_params: dict = field(default_factory=dict)
    optim: OptimSettings | None = None
    loss: LossSettings | None = None
    measure: dict = field(default_factory=dict)
    compare: object = None
    search: tuple | None = None
    datamodule: object = None
    checkpoint: dict | None = None  # the state dict of ckpt_path
    hf_task: tuple | None = None  # what check_hf_task returned


def prepare(cfg: DictConfig, overrides: list[str] | None = None) -> Prepared:
    """Check every setting of a run before any model is built or any weight read: a ConfigError
    names the first wrong one. A multirun checks every job this way before the first one runs."""
    task = check_task(cfg)
    check_settings_used(cfg, task, overrides)
    import_plugins(cfg.get("imports") or [])
    if task in HF_TASKS:
        return Prepared(task, hf_task=check_hf_task(cfg, task, overrides))
    reducer = build_reducer(cfg.reducer, overrides)
    reducer_name, reducer_params = reducer_spec(cfg.reducer)
    optim = _settings(OptimSettings, cfg.get("optim"), "optim")
    loss = _settings(LossSettings, cfg.get("loss"), "loss")
    datamodule = build_datamodule(cfg.data)  # before measure: measure.batch_size defaults to data.batch_size
    mcfg = plain(cfg.measure)
    unknown = sorted(set(mcfg) - set(MEASURE_KEYS))
    if unknown:
        raise ConfigError(f"measure.{unknown[0]} is not a setting; allowed: {', '.join(MEASURE_KEYS)}")
    check_measure(mcfg["batch_size"], mcfg["dtype"], mcfg["autocast"], mcfg["device"], mcfg["warmup"],
                  mcfg["repeats"], probe=bool(mcfg["enabled"]) or task == "compare")
    check_loggers(plain(cfg.logger))
    if task == "finetune":
        check_training_length(plain(cfg.trainer))
        check_monitor(plain(cfg.checkpoint))
    compare_settings = settings_from(cfg) if task == "compare" else None
    search_settings = search_task.settings_from(cfg) if task == "search" else None
    datamodule.shuffle_seed = cfg.seed
    if task not in ("compare", "search") or cfg.eval_split == "val":
        datamodule.check(STAGES[task])
    if cfg.eval_split == "test":
        datamodule.check("test")
    ckpt_path = cfg.get("ckpt_path")
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    return Prepared(task, reducer, reducer_name, reducer_params, optim, loss, mcfg, compare_settings, search_settings,
                    datamodule, checkpoint)


def _run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None) -> RunRecord | None:
    output_dir = Path(output_dir)
    task = check_task(cfg)
    if launched_rank_zero():
        ensure_fresh(output_dir)
    ready = prepare(cfg, overrides)
    if task in HF_TASKS:
        run_task(cfg, task, output_dir, overrides, ready.hf_task)
        return None
    reducer, reducer_name, reducer_params = ready.reducer, ready.reducer_name, ready.reducer_params
    optim, loss, mcfg, datamodule = ready.optim, ready.loss, ready.measure, ready.datamodule
    ckpt_path = cfg.get("ckpt_path")

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model)
    model_cfg = plain(cfg.model)
    if task in ("compare", "search"):
        if ready.checkpoint is not None:
            load_backbone(model, ready.checkpoint, ckpt_path, model_cfg["name"])
        datamodule.bind_model(model)
        weights = weights_label(model_cfg, model, ckpt_path)
        if task == "compare":
            run_compare(cfg, ready.compare, output_dir, model, datamodule, weights, model_cfg["name"],
                        model_cfg.get("adapter_options"))
        else:
            search_task.run_search(cfg, *ready.search, output_dir, model, datamodule, weights, model_cfg["name"],
                                   model_cfg.get("adapter_options"), evaluate_command(overrides))
        return None
    tokenreduce.apply(model, reducer, adapter_options=model_cfg.get("adapter_options"))
    datamodule.bind_model(model)
    module = ReductionModule(model, num_classes=model.num_classes, optim=optim, loss=loss)
    if ready.checkpoint is not None:
        check_fits(ready.checkpoint, module.state_dict(), ckpt_path, model_cfg["name"])
        ready.checkpoint = None  # Lightning reads the file itself
    if task == "finetune":
        check_monitor(plain(cfg.checkpoint), model.num_classes)

    run_name = cfg.get("run_name") or default_run_name(model_cfg["name"], reducer_name, reducer_params)
    loggers = build_loggers(plain(cfg.logger), output_dir, run_name)
    try:
        callbacks = build_callbacks(task, output_dir, plain(cfg.checkpoint), with_loggers=bool(loggers))
        trainer = build_trainer(cfg.trainer, loggers, callbacks, output_dir, checkpointing=task == "finetune")
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        finish = partial(_finish, cfg, task, run_name, model, model_cfg, datamodule, reducer_name, reducer_params,
                         trainer, module, output_dir, mcfg, loggers)
        evaluate = trainer.validate if cfg.eval_split == "val" else trainer.test
        weights = weights_label(model_cfg, model, ckpt_path if task == "evaluate" else None)
        evaluated, eval_ckpt, checkpoints = weights, ckpt_path, {}
        if task == "finetune":
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except RunInterrupted as stop:
                resume = resume_command(overrides, stop.checkpoint)
                finish(weights=weights, evaluated=None, results=[], checkpoints=_checkpoints(trainer),
                       status="interrupted", error=str(stop), resume=resume, timed=False)
                tell(f"interrupted by {stop.signal_name} at step {stop.step}; resume with:\n  {resume}")
                raise
            except BaseException as err:  # SystemExit too: Lightning exits on a second Ctrl-C, rich on a lost pipe
                checkpoints = _checkpoints(trainer)
                resume = resume_command(overrides, checkpoints["last"]) if checkpoints["last"] else None
                finish(weights=weights, evaluated=None, results=[], checkpoints=checkpoints,
                       status="failed" if isinstance(err, Exception) else "interrupted",
                       error=f"{type(err).__name__}: {err}", resume=resume, timed=False)
                if resume:
                    tell(f"stopped by {type(err).__name__} at step {trainer.global_step}; resume from the latest "
                         f"checkpoint with:\n  {resume}")
                raise
            checkpoints = _checkpoints(trainer)
            if checkpoints["best"]:
                evaluated, eval_ckpt = f"checkpoint:{Path(checkpoints['best']).resolve()}", "best"
            else:
                evaluated, eval_ckpt = "fine-tuned (final step, no checkpoint)", None
        try:
            results = evaluate(module, datamodule=datamodule, ckpt_path=eval_ckpt, verbose=False)
        except BaseException as err:  # e.g. an unreadable image: the run directory says what happened
            finish(weights=weights, evaluated=evaluated, results=[], checkpoints=checkpoints, status="failed",
                   error=f"{type(err).__name__}: {err}", timed=False)
            raise
        return finish(weights=weights, evaluated=evaluated, results=results, checkpoints=checkpoints)
    finally:
        finish_loggers(loggers)


def resume_command(overrides: list[str] | None, checkpoint: str) -> str:
    """The command that continues a run from `checkpoint`: the same settings, a new run directory."""
    kept = [o for o in overrides or [] if not o.lstrip("+~").startswith("ckpt_path")]
    return " ".join(["python -m tokenreduce", *map(shlex.quote, kept),
                     shlex.quote(f"ckpt_path={Path(checkpoint).resolve()}")])


def _checkpoints(trainer: L.Trainer) -> dict:
    """The best and the latest checkpoint files a fine-tune has written so far (None: not written)."""
    found = {"best": None, "last": None}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found["best"] = callback.best_model_path or None
        elif isinstance(callback, LatestCheckpoint) and callback.path.is_file():
            found["last"] = str(callback.path)
    return found


def _finish(cfg, task, run_name, model, model_cfg, datamodule, reducer_name, reducer_params, trainer, module,
            output_dir, mcfg, loggers, *, weights, evaluated, results, checkpoints, status="finished", error=None,
            resume=None, timed=True) -> RunRecord | None:
    """Time the model (unless `timed` is off), write the record on rank 0 and log it; a failure while
    timing still writes the record, as "failed", with the metrics measured before it."""
    timing, late_error = None, None
    if timed and mcfg["enabled"]:
        try:
            timing = measure(model, tuple(model_data_config(model)["input_size"]), batch_size=mcfg["batch_size"],
                             dtype=mcfg["dtype"], autocast=mcfg["autocast"], device=mcfg["device"],
                             warmup=mcfg["warmup"], repeats=mcfg["repeats"], seed=cfg.seed)
        except Exception as err:  # keep what was measured before it
            late_error = err
            status, error = "failed", f"measuring throughput: {type(err).__name__}: {err}"
    if not trainer.is_global_zero:
        if late_error is not None:
            raise late_error
        return None
    st = probe_pass(model)
    split = cfg.eval_split
    record = RunRecord(
        run_name=run_name,
        task=task,
        model=model_cfg["name"],
        weights=weights,
        dataset=datamodule.describe(),
        split=split,
        reducer=reducer_name,
        reducer_params=reducer_params,
        adapter_options=model._tokenreduce.changed_options(),
        status=status,
        top1=_metric(results, f"{split}/top1"),
        top5=_metric(results, f"{split}/top5"),
        loss=_metric(results, f"{split}/loss"),
        images_per_s=timing.images_per_s if timing else None,
        measure=timing.as_record(warmup=mcfg.get("warmup"), repeats=mcfg.get("repeats")) if timing else {},
        precision=str(trainer.precision),
        gmacs=st["macs"] / 1e9,
        tokens_per_layer=list(st["tokens"]),
        tokens_out=st["tokens"][-1],
        num_params=sum(p.numel() for p in model.parameters()),
        start_step=getattr(module, "start_step", 0),
        global_step=trainer.global_step,
        resumed_from=str(Path(cfg.ckpt_path).resolve()) if task == "finetune" and cfg.get("ckpt_path") else None,
        best_checkpoint=checkpoints.get("best"),
        last_checkpoint=checkpoints.get("last"),
        evaluated=evaluated,
        resume_command=resume,
        error=error,
        seed=cfg.seed,
        output_dir=str(output_dir),
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
        versions=_versions(),
    )
    for lg in loggers:
        lg.log_metrics({f"result/{k}": v for k, v in record.metrics().items()}, step=trainer.global_step)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update({f"result/{k}": v for k, v in record.to_dict().items()})
    record.write(output_dir)
    print(record.table())
    if late_error is not None:
        raise late_error
    return record
