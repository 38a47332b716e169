"""Lightning callbacks of a run: checkpoints, interruption, learning rate, and the reducer's tokens and MACs."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.utilities import rank_zero_warn

from tokenreduce.api import stats
from tokenreduce.data.resumable import ResumableLoader
from tokenreduce.engine.console import Progress
from tokenreduce.engine.record import CHECKPOINT_DIR, staged_file

LAST_CHECKPOINT = "last.ckpt"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what SLURM sends before a time limit


class TokenStatsCallback(Callback):
    """Logs `<stage>/gmacs` and `<stage>/tokens_out` of the last evaluation pass (per image)."""

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        patch = getattr(model, "_tokenreduce", None)
        if patch is None or patch.last_state is None:
            return
        st = stats(model)
        pl_module.log(f"{stage}/gmacs", st["macs"] / 1e9, sync_dist=False)
        pl_module.log(f"{stage}/tokens_out", float(st["tokens"][-1]), sync_dist=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, "test")


class DatedProgress(ProgressBar):
    """Lightning's progress where standard output is not a terminal (a log file, a pipe, a batch
    job), where its bar would show only its final state: dated lines at the console's pace
    (`console.Progress`), with the progress bar's metrics, e.g.

        2026-12-06 05:40:12 fit, epoch 2/30: 120/469 batches, 64 s; train/loss 0.4321
    """

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._train: Progress | None = None
        self._eval: Progress | None = None

    def disable(self) -> None:  # Lightning disables it on every rank but 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _notes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return ", ".join(f"{k} {float(v):.4f}" if isinstance(v, (int, float)) or hasattr(v, "item") else f"{k} {v}"
                         for k, v in metrics.items())

    @staticmethod
    def _total(counts) -> int | None:
        total = sum(counts) if counts else None
        return None if total is None or total == float("inf") else int(total)

    # --- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._train = Progress(f"fit, epoch {trainer.current_epoch + 1}{epochs}",
                               self._total([self.total_train_batches]), "batches", bar=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._train is not None:
            # the metrics are read and formatted only when a line is due, not at every batch
            self._train.update(1, lambda: self._notes(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train is not None:
            self._train.note = self._notes(trainer, pl_module)  # the epoch's validation metrics too
            self._train.close()
            self._train = None

    # --- validation and test ----------------------------------------------------------------
    def _eval_batch(self, trainer: L.Trainer, what: str, counts) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        if self._eval is None:
            if trainer.state.fn == "fit":
                what = f"fit, epoch {trainer.current_epoch + 1}, {what}"
            self._eval = Progress(what, self._total(counts), "batches", bar=False)
        self._eval.update(1)

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eval is not None:
            self._eval.note = self._notes(trainer, pl_module)
            self._eval.close()
            self._eval = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "validation", trainer.num_val_batches)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "test", trainer.num_test_batches)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for shown in (self._eval, self._train):  # where it stopped
            if shown is not None:
                shown.close()
        self._train = self._eval = None


class RunInterrupted(Exception):
    """A fine-tune stopped by a signal after saving the step it had reached."""

    def __init__(self, signal_name: str, checkpoint: str, step: int):
        super().__init__(f"{signal_name} at step {step}; saved {checkpoint}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value


class LatestCheckpoint(Checkpoint):
    """`checkpoints/last.ckpt` always holds the latest step: it is written at the end of every
    training epoch, and when SIGINT or SIGTERM arrives, at the end of the training batch under way
    (the step, optimizer, scheduler and the loader's position), after which the run stops with
    `RunInterrupted`. A second Ctrl-C stops at once, keeping the last checkpoint written.

    It is written with `save_checkpoint`, so an interruption or a full disk while saving never leaves
    a half-written `last.ckpt`.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.received: str | None = None
        self._handlers: dict = {}
        self._loader_states: list[dict] = []

    # --- resuming mid-epoch -------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = fit_loop.get("state_dict", {}).get("combined_loader", [])

    def _resume_loader(self, trainer: L.Trainer) -> None:
        # Lightning builds the training loader (to count the steps for the schedule) before it
        # restores the loops, and so never hands a resumable loader its state: hand it here.
        states, self._loader_states = self._loader_states, []
        loader = trainer.train_dataloader
        if len(states) == 1 and isinstance(loader, ResumableLoader):
            loader.load_state_dict(states[0])

    # --- signals ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resume_loader(trainer)
        self.received = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in STOP_SIGNALS:
                self._handlers[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signal.Signals(signum).name

    def _restore_handlers(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # --- saving -----------------------------------------------------------------------------
    def _stop_requested(self, trainer: L.Trainer) -> bool:
        received = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        return received

    def save(self, trainer: L.Trainer) -> None:
        save_checkpoint(trainer, self.path)
        trainer.strategy.barrier("LatestCheckpoint.save")

    def _save(self, trainer: L.Trainer, stop: bool) -> None:
        self.save(trainer)
        if stop:
            raise RunInterrupted(self.received or "SIGTERM", str(self.path), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._stop_requested(trainer):
            self._save(trainer, stop=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, stop=self._stop_requested(trainer))


def save_checkpoint(trainer: L.Trainer, path: str | Path, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` to a temporary file that rank 0 (which alone writes it) then renames
    to `path`, replacing an earlier one; a failed save leaves neither `path` nor the temporary."""
    with staged_file(path, replace=True, commit=trainer.is_global_zero) as temporary:
        trainer.save_checkpoint(temporary, weights_only)


class BestCheckpoints(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, writing each checkpoint with `save_checkpoint`, and carrying
    the best checkpoints over when a fine-tune resumes into a new run directory.

    Lightning forgets the earlier best scores there (only `best_model_path` is reloaded), so the
    "best" evaluated at the end would be the best since the resume. Instead the earlier best files
    are copied into this run's directory (the earlier one is left as it is) and their scores kept,
    so the best is the best of the whole fine-tune, as in an uninterrupted run.
    """

    _writes = True  # whether this process writes checkpoints (rank 0)
    _stage = "fit"

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints saved with plain ModelCheckpoint resume the same way
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._writes, self._stage = trainer.is_global_zero, stage

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning's own, with save_checkpoint for trainer.save_checkpoint
        save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def load_state_dict(self, state_dict: dict) -> None:
        if self._stage != "fit":  # evaluating a checkpoint (the best, after fitting): this run's best stays
            return
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        scores = dict(state_dict.get("best_k_models") or {})
        if not scores and state_dict.get("best_model_path"):
            scores = {state_dict["best_model_path"]: state_dict["best_model_score"]}
        gone = [p for p in scores if not Path(p).is_file()]
        if gone:
            rank_zero_warn(f"the best checkpoint(s) {', '.join(gone)} of the run resumed from are gone: the best "
                           "checkpoint of this run is the best of those left and those saved from now on")
        ranked = sorted((p for p in scores if p not in gone), key=lambda p: float(scores[p]),
                        reverse=self.mode == "max")
        self.best_k_models = {}
        for earlier in ranked if self.save_top_k < 0 else ranked[: self.save_top_k]:
            copy = Path(self.dirpath) / Path(earlier).name
            if self._writes:
                copy.parent.mkdir(parents=True, exist_ok=True)
                with staged_file(copy) as temporary:
                    shutil.copyfile(earlier, temporary)
            self.best_k_models[str(copy)] = scores[earlier]
        if not self.best_k_models:
            self.best_model_path = ""
            return
        best, worst = (min, max) if self.mode == "min" else (max, min)
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        if len(self.best_k_models) == self.save_top_k:  # as Lightning sets them once k are kept
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]


def checkpoint_callback(output_dir: str | Path, monitor: str = "val/top1", mode: str = "max", save_top_k: int = 1,
                        save_last: bool = True) -> list[Checkpoint]:
    """The best `save_top_k` checkpoints by `monitor`, and with `save_last` a `LatestCheckpoint`."""
    dirpath = Path(output_dir) / CHECKPOINT_DIR
    best = BestCheckpoints(
        dirpath=str(dirpath),
        filename="best-epoch{epoch:03d}-step{step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=save_top_k,
        save_last=False,  # Lightning refreshes its last.ckpt only when a new best is saved
    )
    return [best, LatestCheckpoint(dirpath)] if save_last else [best]


def build_callbacks(task: str, output_dir: str | Path, checkpoint: dict, with_loggers: bool) -> list[Callback]:
    callbacks: list[Callback] = [TokenStatsCallback()]
    if task == "finetune":
        callbacks += checkpoint_callback(output_dir, **checkpoint)
        if with_loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks
