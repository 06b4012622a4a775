"""Exports the finished run: the weights and metrics.json in the run directory (layout: data/run_folder.py).

Written when training ends and again after the final validation (train.py runs one at the last step if
the validation interval did not land there), so metrics.json always describes the final weights.
``config.yaml`` is written by train.py before training, so a run that dies still says what it was.

With K dictionaries trained on one stream, each gets a sub-folder ``<run_dir>/<l1_x-Fy>/`` that is a
complete run folder of its own (weights, metrics.json, a config.yaml with its own d_sae and l1_coef,
and TensorBoard scalars under the usual tag names), so analysis and sweep tools treat it as any run.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from data.run_folder import TENSORBOARD_DIR, dictionary_dir, write_metrics, write_sub_run_config


class RunExport(L.Callback):
    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self._start = time.time()
        self._writers: dict[str, SummaryWriter] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.time()
        self._fit_ended, self._hparams_step = False, None

    def dictionary_dirs(self, pl_module) -> list[Path]:
        return [dictionary_dir(self.run_dir, name) for name in pl_module.dictionary_names]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_ended = True
        if trainer.is_global_zero:
            self.export(trainer, pl_module)
            if pl_module.last_validated_step == trainer.global_step:  # else train.py validates the final weights
                self.log_hparams(trainer, pl_module)

    HPARAM_METRICS = ("val/explained_variance", "val/l0", "val/dead_fraction", "val/mse")

    def log_hparams(self, trainer: L.Trainer, pl_module) -> None:
        """Each dictionary's hyperparameters with its final validation metrics, once, in TensorBoard's HParams
        view (plugin data beside the scalars), so that a -m sweep over d_sae and l1_coef compares there."""
        if self._hparams_step == trainer.global_step or not trainer.loggers:
            return
        self._hparams_step = trainer.global_step
        from torch.utils.tensorboard.summary import hparams
        hp = pl_module.hparams
        common = {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool)) and k not in ("d_sae", "l1_coef")}
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if batch_size:
            common["batch_size"] = int(batch_size)
        for i, (name, folder) in enumerate(zip(pl_module.dictionary_names, self.dictionary_dirs(pl_module))):
            params = {**common, "d_sae": pl_module.d_saes[i], "l1_coef": pl_module.l1_coefs[i]}
            final = self.metrics_of(trainer, name)
            metrics = {f"hparams/{k}": final[k] for k in self.HPARAM_METRICS if k in final}
            # the run's own TensorBoard writer for one dictionary (no second event file); sub-runs have their own
            writer = trainer.logger.experiment if not name and isinstance(trainer.logger, TensorBoardLogger) else \
                self._writers.get(name) or self._writers.setdefault(name, SummaryWriter(str(folder / TENSORBOARD_DIR)))
            for summary in hparams(params, metrics):
                writer.file_writer.add_summary(summary)
            for key, value in metrics.items():
                writer.add_scalar(key, value, trainer.global_step)
            writer.flush()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.log_dictionaries(trainer, pl_module)
            if trainer.global_step >= trainer.max_steps or self._fit_ended:  # the final weights' validation
                self.export(trainer, pl_module)
                self.log_hparams(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.log_dictionaries(trainer, pl_module)

    def log_dictionaries(self, trainer: L.Trainer, pl_module) -> None:
        """Each of several dictionaries gets its own event file, with the plain tag names."""
        if len(pl_module.dictionary_names) < 2 or not trainer.loggers:
            return
        for name, folder in zip(pl_module.dictionary_names, self.dictionary_dirs(pl_module)):
            writer = self._writers.get(name) or self._writers.setdefault(name, SummaryWriter(str(folder / TENSORBOARD_DIR)))
            for key, value in self.metrics_of(trainer, name).items():
                writer.add_scalar(key, value, trainer.global_step)
            writer.flush()

    @staticmethod
    def metrics_of(trainer: L.Trainer, name: str) -> dict[str, float]:
        prefix = f"{name}/" if name else ""
        out = {}
        for key, value in trainer.callback_metrics.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            if key.startswith(("val/", "train/")) and (not name or "/" in key):
                out[key] = float(value)
        return out

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hp = pl_module.hparams
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        skipped = getattr(trainer.datamodule, "skipped_shards", None)
        for i, (name, folder) in enumerate(zip(pl_module.dictionary_names, self.dictionary_dirs(pl_module))):
            folder.mkdir(parents=True, exist_ok=True)
            cc = pl_module.crosscoders[i]
            cc.save(folder)
            metrics = {k: v for k, v in self.metrics_of(trainer, name).items() if k.startswith("val/")}
            metrics.update(d_sae=cc.d_sae, l1_coef=pl_module.l1_coefs[i], activation=hp.activation,
                           snapshots=list(cc.snapshot_names), steps=trainer.global_step,
                           tokens=(trainer.global_step * batch_size * trainer.world_size * trainer.accumulate_grad_batches
                                   if batch_size else None),
                           skipped_shards=int(skipped.value) if skipped is not None else 0,
                           seconds=round(time.time() - self._start, 1))
            write_metrics(folder, metrics)
            write_sub_run_config(self.run_dir, name, d_sae=cc.d_sae, l1_coef=pl_module.l1_coefs[i])
