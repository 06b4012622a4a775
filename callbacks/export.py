"""Exports the finished run: crosscoder.safetensors and metrics.json in the run directory.

Written when training ends and again after the final validation (train.py runs one at the last step if
the validation interval did not land there), so metrics.json always describes the final weights.
``config.yaml`` is written by train.py before training, so a run that dies still says what it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from data.format import write_atomic


class RunExport(L.Callback):
    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self._start = time.time()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.time()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.global_step >= trainer.max_steps:
            self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pl_module.crosscoder.save(self.run_dir)
        hp = pl_module.hparams
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and isinstance(v, torch.Tensor) and v.numel() == 1}
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        metrics.update(d_sae=hp.d_sae, l1_coef=hp.l1_coef, activation=hp.activation,
                       snapshots=list(pl_module.crosscoder.snapshot_names), steps=trainer.global_step,
                       tokens=trainer.global_step * batch_size * trainer.world_size if batch_size else None,
                       skipped_shards=int(getattr(trainer.datamodule, "skipped_shards", None).value)
                       if hasattr(trainer.datamodule, "skipped_shards") else 0,
                       seconds=round(time.time() - self._start, 1))
        write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
