"""The one definition of each evaluation metric; TensorBoard scalars, metrics.json and figures use these.

Explained variance of snapshot s over a set of evaluation tokens t:

    EV_s = 1 - sum_t ||a_s(t) - a_hat_s(t)||^2 / sum_t ||a_s(t) - mean_t a_s(t)||^2

and overall EV = 1 - (sum over s of the numerators) / (sum over s of the denominators), i.e. the
variance-weighted mean over snapshots. Sums are accumulated in float64 so that a small residual on
large activations is not lost to rounding.

L0 = mean over tokens of the number of latents with f_i > 0.
Dead fraction = share of latents that fired on none of the last N training tokens.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ExplainedVariance(Metric):
    """Accumulates per-snapshot explained variance; ``compute()`` -> [S] tensor, ``overall()`` -> scalar."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_snapshots: int, d_model: int, **kwargs):
        super().__init__(**kwargs)
        f64 = dict(dtype=torch.float64)
        self.add_state("sq_err", torch.zeros(n_snapshots, **f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(n_snapshots, d_model, **f64), dist_reduce_fx="sum")
        self.add_state("sum_sq_x", torch.zeros(n_snapshots, **f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), **f64), dist_reduce_fx="sum")

    def update(self, acts: torch.Tensor, recon: torch.Tensor) -> None:
        """acts, recon: [B, S, D]."""
        a = acts.detach().double()
        self.sq_err += (a - recon.detach().double()).pow(2).sum(dim=(0, 2))
        self.sum_x += a.sum(0)
        self.sum_sq_x += a.pow(2).sum(dim=(0, 2))
        self.count += a.shape[0]

    def _total_variance(self) -> torch.Tensor:
        # sum_t ||a - mean||^2 = sum_t ||a||^2 - n ||mean||^2
        return self.sum_sq_x - self.sum_x.pow(2).sum(-1) / self.count

    def compute(self) -> torch.Tensor:
        return 1 - self.sq_err / self._total_variance()

    def overall(self) -> torch.Tensor:
        return 1 - self.sq_err.sum() / self._total_variance().sum()


class FeatureFiring(Metric):
    """Tokens since each latent last fired; a latent is dead once that passes ``window`` tokens.

    Latents start "fresh" (0), so a run is never called dead before it has seen ``window`` tokens.
    Under DDP the tokens are global: each ``update`` sums the batch's token count and firing counts over
    all ranks (one all-reduce of F + 1 numbers), so the window is ``window`` tokens of the whole run, not of
    each rank, and every rank holds the same state. Every rank must therefore call ``update`` in step.
    """

    full_state_update = False

    def __init__(self, d_sae: int, window: int = 1_000_000, **kwargs):
        super().__init__(**kwargs)
        self.window = window
        # already global and identical on every rank: a sync keeps them as they are
        self.add_state("since_fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("fired_count", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, latents: torch.Tensor) -> None:
        """latents: [B, F] of this rank's batch."""
        counts = torch.cat([(latents.detach() > 0).sum(0).double(),
                            torch.tensor([latents.shape[0]], dtype=torch.float64, device=latents.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size(self.process_group) > 1:
            torch.distributed.all_reduce(counts, group=self.process_group)
        fired, n_tokens = counts[:-1], counts[-1]
        self.since_fired += n_tokens
        self.since_fired[fired > 0] = 0
        self.fired_count += fired
        self.tokens += n_tokens

    def compute(self) -> torch.Tensor:
        """Dead fraction."""
        return (self.since_fired >= self.window).double().mean()

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.window


def l0(latents: torch.Tensor) -> torch.Tensor:
    """Mean number of active latents per token; latents: [B, F]."""
    return (latents > 0).sum(-1).double().mean()
