"""Time the training loop spends waiting for the next batch, so a starved trainer shows in TensorBoard."""

from __future__ import annotations

import time

import lightning as L


class DataWait(L.Callback):
    """Logs ``perf/data_wait_fraction`` (share of training wall time spent between the end of one step and
    the start of the next, i.e. fetching the batch) and ``perf/tokens_per_s``, both since training began."""

    def __init__(self):
        self._first: float | None = None
        self._last_end: float | None = None
        self.wait = 0.0
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        if self._last_end is not None:
            self.wait += now - self._last_end
        elapsed = now - self._first
        if elapsed > 0 and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("perf/data_wait_fraction", self.wait / elapsed)
            pl_module.log("perf/tokens_per_s", self.tokens * trainer.world_size / elapsed)
        self.tokens += batch.shape[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_end = None  # validation is not waiting for training data

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last_end = time.perf_counter()
