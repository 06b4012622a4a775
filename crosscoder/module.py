"""LightningModule: the crosscoder's training math (loss, sparsity warm-up, optimiser, LR schedule).

One module can train K dictionaries on the same batches (``crosscoder.l1_coef=[0.5,1,2]`` and/or a list
of ``d_sae``), so a sparsity sweep reads and normalises the data once. Each dictionary has its own
parameters, loss and metrics; their losses are summed, which leaves each one's gradients independent.

Observation (histograms, export) lives in callbacks/; this module logs the loss terms and the validation
metrics defined in crosscoder/metrics.py.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from crosscoder import revival
from crosscoder.metrics import ExplainedVariance, FeatureFiring, l0
from crosscoder.model import Crosscoder
from data.run_folder import dictionary_name


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class DictionaryMetrics(nn.Module):
    """Validation and firing metrics of one dictionary."""

    def __init__(self, n_snapshots: int, d_model: int, d_sae: int, dead_window_tokens: int):
        super().__init__()
        self.ev = ExplainedVariance(n_snapshots, d_model)
        self.l0 = MeanMetric()  # the shared code's L0 is the same at every snapshot
        self.mse = MeanMetric()  # torchmetrics, so DDP ranks' shares of the held-out set combine
        self.firing = FeatureFiring(d_sae, window=dead_window_tokens)
        self.firing.persistent(True)  # dead-feature counters survive a resume


class CrosscoderModule(L.LightningModule):
    def __init__(self, n_snapshots: int, d_model: int, d_sae: int | list[int] = 1024, activation: str = "relu",
                 l1_coef: float | list[float] = 1.0, l1_warmup_steps: int | float = 0.05, k: int = 32,
                 dec_init_norm: float = 0.1, jumprelu_init_threshold: float = 0.001,
                 jumprelu_bandwidth: float = 0.001, optimizer: str = "adam", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 lr_warmup_steps: int | float = 0.01, lr_decay_start: float = 0.8, lr_final_factor: float = 0.0,
                 dead_window_tokens: int = 1_000_000, tanh_c: float = 4.0, tanh_s: float = 0.01,
                 threshold_lr_factor: float = 1.0, sparse: bool | None = None, snapshot_names: list[str] | None = None,
                 aux_k: int | None = None, aux_coef: float = 0.0, preact_coef: float = 0.0,
                 revive_window_tokens: int | None = None,
                 resample_every: int = 0, resample_until: int | float | None = None,
                 norm_scale: torch.Tensor | list[float] | None = None,
                 data_mean: torch.Tensor | list[list[float]] | None = None):
        """Warm-ups and decay start may be given as a step count (int) or a fraction of max_steps (float <= 1: 1.0
        is the end of training, so ``lr_decay_start=1.0`` means no decay, not step 1).

        norm_scale [S] and data_mean [S, D] (raw units) come from the datamodule; they initialise each
        crosscoder's ``scale`` buffer and ``b_dec`` (the mean of the normalised activations).

        Dead-latent revival (crosscoder/revival.py), for latents silent over ``revive_window_tokens`` tokens (None: the
        dead-feature metric's ``dead_window_tokens``, so what is revived is what the metric calls dead): every
        activation can resample them every ``resample_every`` steps (0: never) until ``resample_until`` (None: the
        LR decay start); topk / batchtopk can add ``aux_coef`` x the AuxK loss over ``aux_k`` dead latents per token
        (None: d_model // 2); jumprelu / topk / batchtopk can add ``preact_coef`` x the pre-activation loss of their dead
        latents. All are off unless given (checkpoints from before load unchanged); conf/crosscoder/ turns resampling
        on, and the pre-activation loss for jumprelu, topk and batchtopk.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["norm_scale", "data_mean"])
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"crosscoder.optimizer: '{optimizer}' is not one of ('adam', 'adamw')")
        for key in ("l1_warmup_steps", "lr_warmup_steps", "lr_decay_start", "resample_until"):
            value = self.hparams[key]
            if value is None:
                continue
            if value < 0 or isinstance(value, float) and value > 1 and not value.is_integer():
                raise ValueError(f"crosscoder.{key}={value}: give a step count (int) or a fraction of "
                                 "trainer.max_steps in [0, 1]")
        revival_terms = (("aux_coef", aux_coef, ("topk", "batchtopk")),
                         ("preact_coef", preact_coef, ("jumprelu", "topk", "batchtopk")))
        for key, value, activations in revival_terms:
            if value and activation not in activations:  # a revival term the chosen activation would silently ignore
                raise ValueError(f"crosscoder.{key}={value} applies to activation {' / '.join(activations)}, not "
                                 f"'{activation}'; leave it 0")
        d_saes, l1_coefs = _as_list(d_sae), _as_list(l1_coef)
        if len(d_saes) > 1 and len(l1_coefs) > 1 and len(d_saes) != len(l1_coefs):
            raise ValueError(f"crosscoder.d_sae {d_saes} and crosscoder.l1_coef {l1_coefs}: give lists of one "
                             "length (pairs) or a single value for one of them")
        n = max(len(d_saes), len(l1_coefs))
        self.d_saes = d_saes * n if len(d_saes) == 1 else d_saes
        self.l1_coefs = [float(c) for c in (l1_coefs * n if len(l1_coefs) == 1 else l1_coefs)]
        # One dictionary keeps the plain tag names; several are told apart by a name prefix.
        self.dictionary_names = [""] if n == 1 else [dictionary_name(c, f) for c, f in zip(self.l1_coefs, self.d_saes)]
        if len(set(self.dictionary_names)) != n:
            raise ValueError(f"crosscoder.l1_coef / d_sae: dictionaries {self.dictionary_names} repeat")

        self.crosscoders = nn.ModuleList()
        self.dict_metrics = nn.ModuleList()
        for f in self.d_saes:
            cc = Crosscoder(n_snapshots, d_model, f, activation=activation, k=k, dec_init_norm=dec_init_norm,
                            jumprelu_init_threshold=jumprelu_init_threshold,
                            jumprelu_bandwidth=jumprelu_bandwidth, snapshot_names=snapshot_names,
                            tanh_c=tanh_c, tanh_s=tanh_s, sparse=sparse)
            if norm_scale is not None:
                cc.scale.copy_(torch.as_tensor(norm_scale, dtype=torch.float32))
            if data_mean is not None:
                cc.init_b_dec(torch.as_tensor(data_mean, dtype=torch.float32) * cc.scale[:, None])
            self.crosscoders.append(cc)
            self.dict_metrics.append(DictionaryMetrics(n_snapshots, d_model, f, dead_window_tokens))
        self.last_validated_step = -1
        self.auxk = aux_coef > 0  # the activation was checked above
        self.aux_k = int(aux_k) if aux_k else max(1, d_model // 2)
        self.preact = preact_coef > 0
        self.revive_window = int(revive_window_tokens) if revive_window_tokens else int(dead_window_tokens)

    @property
    def crosscoder(self) -> Crosscoder:
        """The (first) dictionary."""
        return self.crosscoders[0]

    def tag(self, i: int, name: str) -> str:
        return f"{self.dictionary_names[i]}/{name}" if self.dictionary_names[i] else name

    # ---- schedules -----------------------------------------------------------------------------
    def _steps(self, value: int | float) -> int:
        total = max(int(self.trainer.max_steps), 1) if self._trainer is not None else 1
        return round(value * total) if isinstance(value, float) and value <= 1 else int(value)

    def l1_warmup_factor(self) -> float:
        warm = self._steps(self.hparams.l1_warmup_steps)
        return min(1.0, (self.global_step + 1) / warm) if warm > 0 else 1.0

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to lr_final_factor over the last part of training.

        ``step`` is the optimiser step (0 .. max_steps - 1) the factor applies to: the warm-up reaches 1 at
        step warm - 1, the decay starts from 1 at ``decay_start`` and the last step uses exactly
        lr * lr_final_factor.
        """
        warm = self._steps(self.hparams.lr_warmup_steps)
        last = max(int(self.trainer.max_steps), 1) - 1
        decay_start = self._steps(self.hparams.lr_decay_start)
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if step >= decay_start and last >= decay_start:
            t = min((step - decay_start) / (last - decay_start), 1.0) if last > decay_start else 1.0
            return 1 - t * (1 - self.hparams.lr_final_factor)
        return 1.0

    # ---- training ------------------------------------------------------------------------------
    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw activations [B, S, D] -> normalised units (every dictionary shares the data's scale)."""
        return batch * self.crosscoder.scale[:, None]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = self.normalise(batch)
        warm = self.l1_warmup_factor()
        total = 0.0
        for i, (cc, metrics) in enumerate(zip(self.crosscoders, self.dict_metrics)):
            out = cc(x)
            terms = cc.loss_terms(x, out)
            coef = self.l1_coefs[i] * warm
            loss = terms.mse + coef * terms.sparsity
            dead = revival.dead_mask(metrics.firing, self.revive_window) if self.auxk or self.preact else None
            if dead is not None:  # AuxK: the dead latents reconstruct the residual; preact: they are pushed open
                aux = revival.auxk_loss(cc, x, out, dead, self.aux_k, self.hparams.aux_coef) if self.auxk else 0.0
                if self.preact:
                    aux = aux + revival.preact_loss(cc, x, out, dead, self.hparams.preact_coef)
                self.log_dict({self.tag(i, "train/aux_loss"): aux, self.tag(i, "train/aux_dead"): dead.sum().float()})
                loss = loss + aux
            if not torch.isfinite(loss):
                where = f" in dictionary {self.dictionary_names[i]}" if self.dictionary_names[i] else ""
                raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step} (batch {batch_idx}){where}; "
                                         "the last checkpoint holds the last good weights")
            metrics.firing.update(out.latents)
            if dead is not None:  # dead before this batch, fired in it (on any rank)
                self.log(self.tag(i, "train/revived"), (dead & (metrics.firing.since_fired == 0)).sum().float())
            self.log_dict({self.tag(i, "train/loss"): loss, self.tag(i, "train/mse"): terms.mse,
                           self.tag(i, "train/sparsity"): terms.sparsity, self.tag(i, "train/l0"): terms.l0,
                           self.tag(i, "train/l1_coef"): coef,
                           # 1 when the step took a sparse path (crosscoder/sparse.py): its share is what the run's
                           # speed depends on (docs/PERFORMANCE.md)
                           self.tag(i, "train/sparse_path"): float(out.active is not None)})
            total = total + loss
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("l0", terms.l0, prog_bar=True, logger=False)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.hparams.resample_every
        until = self.hparams.resample_until
        until = self._steps(self.hparams.lr_decay_start if until is None else until)
        if every and self.global_step % every == 0 and self.global_step < until:
            self.resample_dead(self.normalise(batch))
        if (self.global_step % max(self.trainer.log_every_n_steps, 1)) == 0:
            for i, metrics in enumerate(self.dict_metrics):
                self.log(self.tag(i, "train/dead_fraction"), metrics.firing.compute().float())
            skipped = getattr(self.trainer.datamodule, "skipped_shards", None)
            if skipped is not None:
                self.log("data/skipped_shards", float(skipped.value))

    def resample_dead(self, x: torch.Tensor) -> None:
        """Resample every dictionary's latents dead for ``revive_window_tokens`` toward x's high-loss tokens."""
        optimizer = self.optimizers().optimizer
        # drawn from the step number, not the global RNG: a resumed run resamples exactly as an uninterrupted one
        generator = torch.Generator(device=x.device).manual_seed(self.global_step)
        for i, (cc, metrics) in enumerate(zip(self.crosscoders, self.dict_metrics)):
            # The firing counters are left as they are: a resampled latent counts as dead until it fires on a
            # training token, and one that has not by the next call is drawn again toward another token.
            idx = revival.resample(cc, x, revival.dead_mask(metrics.firing, self.revive_window),
                                   optimizer, self.hparams.dec_init_norm, self.hparams.jumprelu_init_threshold,
                                   generator=generator, match_living=self.hparams.activation in ("topk", "batchtopk"))
            self.log(self.tag(i, "train/resampled"), float(len(idx)))

    def setup(self, stage: str) -> None:
        revival.check_strategy(self.trainer.strategy, self.hparams.resample_every)

    # ---- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x = self.normalise(batch)
        for cc, metrics in zip(self.crosscoders, self.dict_metrics):
            out = cc(x)
            metrics.ev.update(x, out.recon)
            metrics.l0.update(l0(out.latents), weight=x.shape[0])
            metrics.mse.update(cc.loss_terms(x, out).mse, weight=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        for i, (cc, metrics) in enumerate(zip(self.crosscoders, self.dict_metrics)):
            if not metrics.ev.update_called:
                return
            values = {"val/explained_variance": metrics.ev.overall().float(), "val/l0": metrics.l0.compute().float(),
                      "val/mse": metrics.mse.compute().float(), "val/dead_fraction": metrics.firing.compute().float()}
            for name, ev in zip(cc.snapshot_names, metrics.ev.compute()):
                values[f"val/explained_variance/{name}"] = ev.float()
            self.log_dict({self.tag(i, k): v for k, v in values.items()}, sync_dist=True)
            if i == 0:
                self.log("val_ev", values["val/explained_variance"], prog_bar=True, logger=False)
            for metric in (metrics.ev, metrics.l0, metrics.mse):
                metric.reset()
        self.last_validated_step = self.global_step

    # ---- optimiser -----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        # The fused kernel updates all state in one pass: on CPU the unfused Adam (a div and a sqrt pass over
        # every parameter) took 16% of a large step in bench/step.py's profile, fused takes a sixth of that.
        # JumpReLU thresholds may learn at their own rate (the paper: 0.1x the lr for Pythia-160M)
        thresholds = [p for n, p in self.crosscoders.named_parameters() if n.endswith("log_threshold")]
        others = [p for n, p in self.crosscoders.named_parameters() if not n.endswith("log_threshold")]
        groups = [{"params": others}] + ([{"params": thresholds, "lr": hp.lr * hp.threshold_lr_factor}] if thresholds else [])
        opt = cls(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
