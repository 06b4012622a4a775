"""Exports the finished run: crosscoder.safetensors and metrics.json in the run directory.

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
        if not trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pl_module.crosscoder.save(self.run_dir)
        hp = pl_module.hparams
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and isinstance(v, torch.Tensor) and v.numel() == 1}
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        metrics.update(d_sae=hp.d_sae, l1_coef=hp.l1_coef, activation=hp.activation,
                       snapshots=list(pl_module.crosscoder.snapshot_names), steps=trainer.global_step,
                       tokens=trainer.global_step * batch_size * trainer.world_size if batch_size else None,
                       seconds=round(time.time() - self._start, 1))
        write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
