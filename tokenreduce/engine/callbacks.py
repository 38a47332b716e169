"""Lightning callbacks of a run: checkpoints, learning rate, and the reducer's tokens and MACs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from tokenreduce.api import stats
from tokenreduce.engine.record import CHECKPOINT_DIR


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


def checkpoint_callback(output_dir: str | Path, monitor: str = "val/top1", mode: str = "max", save_top_k: int = 1,
                        save_last: bool = True) -> ModelCheckpoint:
    """`last.ckpt` after every validation, and the best `save_top_k` by `monitor`."""
    return ModelCheckpoint(
        dirpath=str(Path(output_dir) / CHECKPOINT_DIR),
        filename="best-epoch{epoch:03d}-step{step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=save_top_k,
        save_last=save_last,
    )


def build_callbacks(task: str, output_dir: str | Path, checkpoint: dict, with_loggers: bool) -> list[Callback]:
    callbacks: list[Callback] = [TokenStatsCallback()]
    if task == "finetune":
        callbacks.append(checkpoint_callback(output_dir, **checkpoint))
        if with_loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks
