"""Per-snapshot histograms of decoder norms ||W_dec[i, s]||: how many features exist, and how strongly, at s."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class DecoderNormHistograms(L.Callback):
    def __init__(self, every_n_steps: int = 500):
        self.every_n_steps = every_n_steps

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        crosscoder = pl_module.crosscoder
        norms = crosscoder.decoder_norms().detach().float().cpu()  # [F, S]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for s, name in enumerate(crosscoder.snapshot_names):
                    logger.experiment.add_histogram(f"decoder_norm/{name}", norms[:, s], trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._log(trainer, pl_module)
