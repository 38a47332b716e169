"""What task=evaluate and task=finetune share: a reduced timm model in a `ReductionModule`, run by a
Lightning trainer, and the record of the run (`LightningRun.finish`)."""

from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

import tokenreduce
from tokenreduce.cost import probe_pass
from tokenreduce.data.transforms import model_data_config
from tokenreduce.engine.callbacks import DatedProgress, LatestCheckpoint, RunInterrupted, build_callbacks
from tokenreduce.engine.config import build_reducer, default_run_name, plain, reducer_spec, settings_of
from tokenreduce.engine.console import interactive, show, tell
from tokenreduce.engine.loggers import build_loggers, check_loggers, finish_loggers
from tokenreduce.engine.module import LossSettings, OptimSettings, ReductionModule
from tokenreduce.engine.record import RunRecord
from tokenreduce.engine.speed import measure
from tokenreduce.engine.tasks import RunContext
from tokenreduce.engine.tasks.common import ImageRun, build_model, weights_label
from tokenreduce.engine.weights import check_fits
from tokenreduce.errors import ConfigError


@dataclass
class ReducedModelSettings:
    """The settings of a run of one reduced model through Lightning, checked before any compute."""

    reducer: object
    reducer_name: str
    reducer_params: dict
    optim: OptimSettings
    loss: LossSettings
    image: ImageRun

    @classmethod
    def check(cls, cfg: DictConfig, overrides: list[str] | None, stage: str) -> ReducedModelSettings:
        reducer = build_reducer(cfg.reducer, overrides)
        name, params = reducer_spec(cfg.reducer)
        optim = settings_of(OptimSettings, cfg.get("optim"), "optim")
        loss = settings_of(LossSettings, cfg.get("loss"), "loss")
        image = ImageRun.check(cfg, stage, probe=bool(plain(cfg.measure)["enabled"]))
        check_loggers(plain(cfg.logger))
        return cls(reducer, name, params, optim, loss, image)


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
    if not interactive():  # a redrawn bar and rich's boxes show nothing useful in a file
        if kwargs.get("enable_progress_bar", True):
            callbacks = [*callbacks, DatedProgress()]
        if kwargs.get("enable_model_summary", True):  # the plain summary goes through logging, into the log
            kwargs["enable_model_summary"] = False
            callbacks = [*callbacks, ModelSummary()]
    try:
        return L.Trainer(default_root_dir=str(output_dir), logger=loggers or False, callbacks=callbacks,
                         enable_checkpointing=checkpointing, **kwargs)
    except TypeError as err:
        raise ConfigError(f"trainer: {err}; the trainer config takes lightning.Trainer arguments") from None
    except MisconfigurationException as err:
        raise ConfigError(f"trainer: {err}") from None


def resume_command(overrides: list[str] | None, checkpoint: str) -> str:
    """The command that continues a run from `checkpoint`: the same settings, a new run directory."""
    kept = [o for o in overrides or [] if not o.lstrip("+~").startswith("ckpt_path")]
    return " ".join(["python -m tokenreduce", *map(shlex.quote, kept),
                     shlex.quote(f"ckpt_path={Path(checkpoint).resolve()}")])


def checkpoints_of(trainer: L.Trainer) -> dict:
    """The best and the latest checkpoint files a fine-tune has written so far (None: not written)."""
    found = {"best": None, "last": None}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found["best"] = callback.best_model_path or None
        elif isinstance(callback, LatestCheckpoint) and callback.path.is_file():
            found["last"] = str(callback.path)
    return found


def metric(results: list[dict], key: str) -> float | None:
    """The value of `key` in Lightning's results, None when not logged."""
    for result in results:
        if key in result:
            return float(result[key])
    return None


def versions() -> dict:
    return {"tokenreduce": tokenreduce.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "lightning": L.__version__}


@dataclass
class LightningRun:
    """One run of a reduced model through Lightning: what its record is made of."""

    context: RunContext
    task: str
    settings: ReducedModelSettings
    model: torch.nn.Module
    model_cfg: dict
    module: ReductionModule
    trainer: L.Trainer
    loggers: list
    run_name: str

    def finish(self, *, weights, evaluated, results, checkpoints, status="finished", error=None, resume=None,
               timed=True) -> RunRecord | None:
        """Time the model (unless `timed` is off), write the record on rank 0 and log it; a failure
        while timing still writes the record, as "failed", with the metrics measured before it."""
        cfg, model, trainer, mcfg = self.context.cfg, self.model, self.trainer, self.settings.image.measure
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
            run_name=self.run_name,
            task=self.task,
            model=self.model_cfg["name"],
            weights=weights,
            dataset=self.settings.image.datamodule.describe(),
            split=split,
            reducer=self.settings.reducer_name,
            reducer_params=self.settings.reducer_params,
            adapter_options=model._tokenreduce.changed_options(),
            status=status,
            top1=metric(results, f"{split}/top1"),
            top5=metric(results, f"{split}/top5"),
            loss=metric(results, f"{split}/loss"),
            images_per_s=timing.images_per_s if timing else None,
            measure=timing.as_record(warmup=mcfg.get("warmup"), repeats=mcfg.get("repeats")) if timing else {},
            precision=str(trainer.precision),
            gmacs=st["macs"] / 1e9,
            tokens_per_layer=list(st["tokens"]),
            tokens_out=st["tokens"][-1],
            num_params=sum(p.numel() for p in model.parameters()),
            start_step=getattr(self.module, "start_step", 0),
            global_step=trainer.global_step,
            resumed_from=str(Path(cfg.ckpt_path).resolve()) if self.task == "finetune" and cfg.get("ckpt_path")
            else None,
            best_checkpoint=checkpoints.get("best"),
            last_checkpoint=checkpoints.get("last"),
            evaluated=evaluated,
            resume_command=resume,
            error=error,
            seed=cfg.seed,
            output_dir=str(self.context.output_dir),
            finished=datetime.datetime.now().isoformat(timespec="seconds"),
            versions=versions(),
        )
        for lg in self.loggers:
            lg.log_metrics({f"result/{k}": v for k, v in record.metrics().items()}, step=trainer.global_step)
            if isinstance(lg, WandbLogger):
                lg.experiment.summary.update({f"result/{k}": v for k, v in record.to_dict().items()})
        record.write(self.context.output_dir)
        show(record.table())
        if late_error is not None:
            raise late_error
        return record

    def failed(self, err: BaseException, weights: str, evaluated: str | None, checkpoints: dict) -> None:
        """The record of a run stopped by `err`: "failed", or "interrupted" for SystemExit and
        KeyboardInterrupt (Lightning exits on a second Ctrl-C, rich on a lost pipe), with the command
        that resumes from the latest checkpoint when there is one."""
        resume = resume_command(self.context.overrides, checkpoints["last"]) if checkpoints.get("last") else None
        self.finish(weights=weights, evaluated=evaluated, results=[], checkpoints=checkpoints,
                    status="failed" if isinstance(err, Exception) else "interrupted",
                    error=f"{type(err).__name__}: {err}", resume=resume, timed=False)
        if resume:
            tell(f"stopped by {type(err).__name__} at step {self.trainer.global_step}; resume from the latest "
                 f"checkpoint with:\n  {resume}")


def run_reduced_model(context: RunContext, task: str, settings: ReducedModelSettings,
                      extra_check=None) -> RunRecord | None:
    """Build the model, reduce it, then evaluate it (task=evaluate) or fine-tune and evaluate its best
    checkpoint (task=finetune); the record on rank 0. `extra_check(model)`: a task's own check that
    needs the model, run before any compute."""
    cfg, output_dir = context.cfg, context.output_dir
    ckpt_path = cfg.get("ckpt_path")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model)
    model_cfg = plain(cfg.model)
    tokenreduce.apply(model, settings.reducer, adapter_options=model_cfg.get("adapter_options"))
    datamodule = settings.image.datamodule
    datamodule.bind_model(model)
    module = ReductionModule(model, num_classes=model.num_classes, optim=settings.optim, loss=settings.loss)
    if settings.image.checkpoint is not None:
        check_fits(settings.image.checkpoint, module.state_dict(), ckpt_path, model_cfg["name"])
        settings.image.checkpoint = None  # Lightning reads the file itself
    if extra_check is not None:
        extra_check(model)

    fitting = task == "finetune"
    run_name = cfg.get("run_name") or default_run_name(model_cfg["name"], settings.reducer_name,
                                                       settings.reducer_params)
    loggers = build_loggers(plain(cfg.logger), output_dir, run_name)
    try:
        callbacks = build_callbacks(task, output_dir, plain(cfg.checkpoint), with_loggers=bool(loggers))
        trainer = build_trainer(cfg.trainer, loggers, callbacks, output_dir, checkpointing=fitting)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        this = LightningRun(context, task, settings, model, model_cfg, module, trainer, loggers, run_name)
        evaluate = trainer.validate if cfg.eval_split == "val" else trainer.test
        weights = weights_label(model_cfg, model, None if fitting else ckpt_path)
        evaluated, eval_ckpt, checkpoints = weights, ckpt_path, {}
        if fitting:
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except RunInterrupted as stop:
                resume = resume_command(context.overrides, stop.checkpoint)
                this.finish(weights=weights, evaluated=None, results=[], checkpoints=checkpoints_of(trainer),
                            status="interrupted", error=str(stop), resume=resume, timed=False)
                tell(f"interrupted by {stop.signal_name} at step {stop.step}; resume with:\n  {resume}")
                raise
            except BaseException as err:
                this.failed(err, weights, None, checkpoints_of(trainer))
                raise
            checkpoints = checkpoints_of(trainer)
            if checkpoints["best"]:
                evaluated, eval_ckpt = f"checkpoint:{Path(checkpoints['best']).resolve()}", "best"
            else:
                evaluated, eval_ckpt = "fine-tuned (final step, no checkpoint)", None
        try:
            results = evaluate(module, datamodule=datamodule, ckpt_path=eval_ckpt, verbose=False)
        except BaseException as err:  # e.g. an unreadable image: the run directory says what happened
            this.failed(err, weights, evaluated, checkpoints)
            raise
        return this.finish(weights=weights, evaluated=evaluated, results=results, checkpoints=checkpoints)
    finally:
        finish_loggers(loggers)
