"""LightningModule: the crosscoder's training math (loss, sparsity warm-up, optimiser, LR schedule).

Observation (dead features, histograms, export) lives in callbacks/; this module only logs the loss terms
and the validation metrics defined in crosscoder/metrics.py.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics import MeanMetric

from crosscoder.metrics import ExplainedVariance, FeatureFiring, l0
from crosscoder.model import Crosscoder


class CrosscoderModule(L.LightningModule):
    def __init__(self, n_snapshots: int, d_model: int, d_sae: int = 1024, activation: str = "relu",
                 l1_coef: float = 1.0, l1_warmup_steps: int | float = 0.05, k: int = 32,
                 dec_init_norm: float = 0.1, jumprelu_init_threshold: float = 0.001,
                 jumprelu_bandwidth: float = 0.001, optimizer: str = "adam", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 lr_warmup_steps: int | float = 0.01, lr_decay_start: float = 0.8, lr_final_factor: float = 0.0,
                 dead_window_tokens: int = 1_000_000, snapshot_names: list[str] | None = None,
                 norm_scale: torch.Tensor | list[float] | None = None,
                 data_mean: torch.Tensor | list[list[float]] | None = None):
        """Warm-ups and decay start may be given as a step count (int) or a fraction of max_steps (float < 1).

        norm_scale [S] and data_mean [S, D] (raw units) come from the datamodule; they initialise the
        crosscoder's ``scale`` buffer and ``b_dec`` (the mean of the normalised activations).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["norm_scale", "data_mean"])
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"crosscoder.optimizer: '{optimizer}' is not one of ('adam', 'adamw')")
        self.crosscoder = Crosscoder(n_snapshots, d_model, d_sae, activation=activation, k=k,
                                     dec_init_norm=dec_init_norm, jumprelu_init_threshold=jumprelu_init_threshold,
                                     jumprelu_bandwidth=jumprelu_bandwidth, snapshot_names=snapshot_names)
        if norm_scale is not None:
            self.crosscoder.scale.copy_(torch.as_tensor(norm_scale, dtype=torch.float32))
        if data_mean is not None:
            mean = torch.as_tensor(data_mean, dtype=torch.float32)
            self.crosscoder.init_b_dec(mean * self.crosscoder.scale[:, None])
        self.val_ev = ExplainedVariance(n_snapshots, d_model)
        self.val_l0 = MeanMetric()  # the shared code's L0 is the same at every snapshot
        self.val_mse = MeanMetric()  # torchmetrics, so DDP ranks' halves of the held-out set are combined
        self.firing = FeatureFiring(d_sae, window=dead_window_tokens)
        self.firing.persistent(True)  # dead-feature counters survive a resume
        self.last_validated_step = -1

    # ---- schedules -----------------------------------------------------------------------------
    def _steps(self, value: int | float) -> int:
        total = max(int(self.trainer.max_steps), 1) if self._trainer is not None else 1
        return int(value * total) if isinstance(value, float) and value < 1 else int(value)

    def l1_coef_now(self) -> float:
        warm = self._steps(self.hparams.l1_warmup_steps)
        frac = min(1.0, (self.global_step + 1) / warm) if warm > 0 else 1.0
        return self.hparams.l1_coef * frac

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to lr_final_factor over the last part of training."""
        warm = self._steps(self.hparams.lr_warmup_steps)
        total = max(int(self.trainer.max_steps), 1)
        decay_start = self._steps(self.hparams.lr_decay_start)
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if step >= decay_start and total > decay_start:
            t = (step - decay_start) / (total - decay_start)
            return 1 - t * (1 - self.hparams.lr_final_factor)
        return 1.0

    # ---- training ------------------------------------------------------------------------------
    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw activations [B, S, D] -> normalised units."""
        return batch * self.crosscoder.scale[:, None]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict:
        x = self.normalise(batch)
        out = self.crosscoder(x)
        terms = self.crosscoder.loss_terms(x, out)
        coef = self.l1_coef_now()
        loss = terms.mse + coef * terms.sparsity
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step} (batch {batch_idx}); "
                                     "the last checkpoint holds the last good weights")
        self.firing.update(out.latents)
        self.log_dict({"train/loss": loss, "train/mse": terms.mse, "train/sparsity": terms.sparsity,
                       "train/l0": terms.l0, "train/l1_coef": coef,
                       "train/lr": self.lr_schedulers().get_last_lr()[0]}, prog_bar=False)
        self.log("l0", terms.l0, prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (self.global_step % max(self.trainer.log_every_n_steps, 1)) == 0:
            self.log("train/dead_fraction", self.firing.compute().float())
            skipped = getattr(self.trainer.datamodule, "skipped_shards", None)
            if skipped is not None:
                self.log("data/skipped_shards", float(skipped.value))

    # ---- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x = self.normalise(batch)
        out = self.crosscoder(x)
        self.val_ev.update(x, out.recon)
        self.val_l0.update(l0(out.latents), weight=x.shape[0])
        self.val_mse.update(self.crosscoder.loss_terms(x, out).mse, weight=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.val_ev.update_called:
            return
        per_snapshot = self.val_ev.compute()
        metrics = {"val/explained_variance": self.val_ev.overall().float(),
                   "val/l0": self.val_l0.compute().float(),
                   "val/mse": self.val_mse.compute().float(),
                   "val/dead_fraction": self.firing.compute().float()}
        for name, ev in zip(self.crosscoder.snapshot_names, per_snapshot):
            metrics[f"val/explained_variance/{name}"] = ev.float()
        self.log_dict(metrics, prog_bar=False, sync_dist=True)
        self.log("val_ev", metrics["val/explained_variance"], prog_bar=True, logger=False)
        self.val_ev.reset()
        self.val_l0.reset()
        self.val_mse.reset()
        self.last_validated_step = self.global_step

    # ---- optimiser -----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        opt = cls(self.crosscoder.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
