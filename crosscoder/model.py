"""The crosscoder: one sparse dictionary over the activations of S snapshots of one model.

Axes: B batch (tokens), S snapshots, D model width, F dictionary size (latents).

    f      = act( sum_s a_s W_enc[s] + b_enc )                  [B, F]
    a_hat_s = f W_dec[:, s] + b_dec[s]                          [B, S, D]
    loss   = sum_s ||a_s - a_hat_s||^2 + l1_coef * sum_i f_i sum_s ||W_dec[i, s]||   (mean over tokens)

The sparsity weight is the sum of per-snapshot decoder norms (Lindsey et al. 2024), which lets a latent
exist at some snapshots and not at others; ||W_dec[i, s]|| is read as feature i's strength at snapshot s.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from crosscoder import paper_loop, sparse
from data.format import atomic_path
from data.run_folder import WEIGHTS_NAME

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk", "paper")


class CrosscoderOutput(NamedTuple):
    latents: torch.Tensor  # [B, F] feature activations f (after the activation function)
    recon: torch.Tensor  # [B, S, D] reconstruction a_hat, in normalised units
    pre_acts: torch.Tensor  # [B, F] encoder pre-activations (without gradient on the sparse paths)
    # the code's active entries when the sparse path ran (crosscoder/sparse.py); PaperActive for "paper"
    active: sparse.Active | sparse.PaperActive | None = None
    # "paper": the tanh-quad penalty's sums [F] over tokens and snapshots of tanh(c f ||W_dec[i, s]||), and the
    # decoder norms [F, S] and thresholds [F] (no gradient) that gated each snapshot's code
    penalty_sums: torch.Tensor | None = None
    snapshot_gates: tuple[torch.Tensor, torch.Tensor] | None = None

    def snapshot_code(self, s: int) -> torch.Tensor:
        """[B, F] the code that snapshot s decodes: ``latents`` for every activation but "paper", whose per-snapshot
        gates give each snapshot its own code, pre * H(pre * ||W_dec[i, s]|| - t_i) (no gradient)."""
        if self.snapshot_gates is not None:
            norms, threshold = self.snapshot_gates
            pre = self.pre_acts.detach()
            return pre * (pre * norms[:, s] > threshold).to(pre.dtype)
        return self.latents


class LossTerms(NamedTuple):
    mse: torch.Tensor  # scalar: sum over snapshots of squared error, mean over tokens
    sparsity: torch.Tensor  # scalar: the penalty before l1_coef (L1 or, for jumprelu, L0-style)
    l0: torch.Tensor  # scalar: mean number of active latents per token


def _step_ste(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Heaviside(x - threshold) whose gradient w.r.t. the threshold is a rectangle-kernel estimate.

    Rajamanoharan et al. 2024 (JumpReLU SAEs): d/dt H(x - t) ~ -1/eps * rect((x - t)/eps).
    """
    return _JumpStep.apply(x, threshold, bandwidth)


class _JumpStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((x - threshold).abs() < eps / 2).to(grad.dtype)
        grad_t = (-grad * window / eps).sum_to_size(threshold.shape)  # also one threshold per entry (sparse.py)
        return None, grad_t, None


class _JumpReLU(torch.autograd.Function):
    """crosscoder=jumprelu: pre * H(pre * n - t), with n = sum_s ||W_dec[i, s]|| (passed without gradient) and t the
    threshold in the units of the latent's contribution to the reconstruction.

    Gating on pre * n rather than on pre makes the code invariant to rescaling a latent (W_enc, b_enc times c,
    W_dec divided by c): the gate, the value's contribution and the L0 penalty are all unchanged.
    Gradient: exact w.r.t. pre where open (the gate passes none to pre or n); straight-through w.r.t. t
    (Rajamanoharan et al. 2024): d/dt ~ -pre / eps * 1{|pre * n - t| < eps / 2}, pre being the size of the jump
    there (~ t / n)."""

    @staticmethod
    def forward(ctx, pre, norm_sum, threshold, bandwidth):
        g = pre * norm_sum
        open_ = g > threshold
        window = (g - threshold).abs() < bandwidth / 2
        ctx.save_for_backward(pre, open_, window)
        ctx.bandwidth = bandwidth
        return pre * open_.to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, open_, window = ctx.saved_tensors
        grad_t = (-grad * pre * window.to(grad.dtype) / ctx.bandwidth).reshape(-1, pre.shape[-1]).sum(0)
        return grad * open_.to(grad.dtype), None, grad_t, None


def jumprelu_threshold_from_v1(log_threshold: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """A version-1 jumprelu log threshold (gate pre > t) as version 2 (gate pre * n > t * n, n = sum_s ||W_dec[i, s]||):
    the same gates wherever n > 0 (a latent with a zero decoder contributes nothing either way)."""
    n = W_dec.float().norm(dim=-1).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    return (log_threshold.float() + n.log()).to(log_threshold.dtype)


class Crosscoder(nn.Module):
    """W_enc [S, D, F], b_enc [F], W_dec [F, S, D], b_dec [S, D]; ``scale`` [S] is the per-snapshot
    normalisation factor applied to raw activations before encoding (kept with the weights so decoder
    norms stay comparable across snapshots and raw activations can be reconstructed)."""

    # The state-dict version (nn.Module's own marker, kept in every state_dict, so in Lightning checkpoints; and in
    # crosscoder.safetensors' metadata). 2: the jumprelu threshold is in the units of the latent's contribution,
    # pre * sum_s ||W_dec[i, s]||; in version 1 it was compared with pre itself. Loading a version-1 jumprelu state
    # converts it (t * sum_s ||W_dec[i, s]||), which opens exactly the same gates.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, dec = prefix + "log_threshold", prefix + "W_dec"
        if (self.activation == "jumprelu" and local_metadata.get("version") == 1 and key in state_dict
                and dec in state_dict):
            state_dict[key] = jumprelu_threshold_from_v1(state_dict[key], state_dict[dec])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __init__(self, n_snapshots: int, d_model: int, d_sae: int, activation: str = "relu",
                 k: int = 32, dec_init_norm: float = 0.1, jumprelu_init_threshold: float = 0.001,
                 jumprelu_bandwidth: float = 0.001, snapshot_names: list[str] | None = None,
                 sparse: bool | None = None, tanh_c: float = 4.0, tanh_s: float = 0.01):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"crosscoder.activation: '{activation}' is not one of {ACTIVATIONS}")
        if activation in ("topk", "batchtopk") and not 0 < k <= d_sae:
            raise ValueError(f"crosscoder.k: {k} must be in 1..d_sae={d_sae}")
        S, D, F = n_snapshots, d_model, d_sae
        self.n_snapshots, self.d_model, self.d_sae = S, D, F
        self.activation, self.k = activation, k
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.sparse = sparse  # None: automatic (see use_sparse)
        self.tanh_c, self.tanh_s = tanh_c, tanh_s  # "paper": the tanh-quad penalty's c and s
        self.snapshot_names = list(snapshot_names) if snapshot_names else [f"snapshot{i}" for i in range(S)]
        if len(self.snapshot_names) != S:
            raise ValueError(f"snapshot_names has {len(self.snapshot_names)} names for {S} snapshots")
        self.W_enc = nn.Parameter(torch.empty(S, D, F))
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.empty(F, S, D))
        self.b_dec = nn.Parameter(torch.zeros(S, D))
        self.register_buffer("scale", torch.ones(S))
        if activation in ("jumprelu", "paper"):
            self.log_threshold = nn.Parameter(torch.full((F,), float(torch.tensor(jumprelu_init_threshold).log())))
        # BatchTopK uses a per-batch threshold in training and this running estimate at inference
        # (Bussmann et al. 2024), so a token's code does not depend on the rest of its batch.
        self.register_buffer("batchtopk_threshold", torch.tensor(-1.0))
        self.reset_parameters(dec_init_norm)

    @torch.no_grad()
    def reset_parameters(self, dec_init_norm: float = 0.1) -> None:
        # One random direction per latent, repeated for every snapshot (as in the paper's code), so all
        # snapshots start equal and differences in decoder norm come from the data alone.
        direction = torch.randn(self.d_sae, 1, self.d_model)
        direction = direction / direction.norm(dim=-1, keepdim=True) * dec_init_norm
        self.W_dec.copy_(direction.expand(-1, self.n_snapshots, -1))
        self.W_enc.copy_(self.W_dec.permute(1, 2, 0))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        """mean: [S, D] mean of the normalised activations."""
        self.b_dec.copy_(mean)

    def decoder_norms(self) -> torch.Tensor:
        """[F, S]: ||W_dec[i, s]||, the strength of feature i at snapshot s."""
        return self.W_dec.norm(dim=-1)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D] normalised activations -> pre-activations [B, F] (one matmul over S*D)."""
        B = x.shape[0]
        return x.reshape(B, -1) @ self.W_enc.reshape(-1, self.d_sae) + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":  # gated on the contribution pre * sum_s ||W_dec[i, s]|| (see _JumpReLU)
            return _JumpReLU.apply(pre, self.decoder_norms().sum(-1).detach(), self.log_threshold.exp(),
                                   self.jumprelu_bandwidth)
        # TopK variants rank by the latent's contribution to the reconstruction, f_i * sum_s ||W_dec[i,s]||,
        # so a latent with a tiny decoder cannot win a slot by a large activation alone.
        post = torch.relu(pre)
        score = post * self.decoder_norms().sum(-1)
        if self.activation == "topk":
            idx = score.topk(self.k, dim=-1).indices
            return torch.zeros_like(post).scatter(-1, idx, post.gather(-1, idx))
        if self.training:
            n = min(self.k * pre.shape[0], score.numel())
            flat_idx = score.flatten().topk(n).indices
            kept = torch.zeros_like(post).flatten().scatter(0, flat_idx, post.flatten().gather(0, flat_idx))
            with torch.no_grad():
                t = score.flatten()[flat_idx].min()
                self.batchtopk_threshold.copy_(t if self.batchtopk_threshold < 0 else
                                               0.99 * self.batchtopk_threshold + 0.01 * t)
            return kept.view_as(post)
        return post * (score > self.batchtopk_threshold.clamp(min=0)).to(post.dtype)

    def use_sparse(self, active_per_token: float) -> bool:
        """Whether to take the active-latents-only path (crosscoder/sparse.py) for a code with this many active
        latents per token: where it wins, or as ``sparse`` = True / False forces. topk, relu and jumprelu have
        one, and so has paper (counted per token and snapshot); batchtopk stays dense."""
        return sparse.sparse_wins(self.d_sae, active_per_token) if self.sparse is None else self.sparse

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F] -> reconstruction [B, S, D]."""
        B = latents.shape[0]
        return (latents @ self.W_dec.reshape(self.d_sae, -1)).view(B, self.n_snapshots, self.d_model) + self.b_dec

    def forward(self, x: torch.Tensor) -> CrosscoderOutput:
        """x: [B, S, D] normalised activations."""
        if self.activation == "paper":
            return self._forward_paper(x)
        B = x.shape[0]
        if self.activation == "topk" and self.use_sparse(self.k):
            active, recon, pre = sparse.topk_forward(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)
            return CrosscoderOutput(latents=active.dense(B, self.d_sae), recon=recon, pre_acts=pre, active=active)
        pre = self.encode_pre(x)
        if self.activation in ("relu", "jumprelu") and self.sparse is not False:
            # The pre-activations are dense either way; this batch's own density decides the rest of the step.
            threshold = norm_sum = None
            if self.activation == "jumprelu":  # the gate's input is pre * norm_sum, as in _JumpReLU
                threshold, norm_sum = self.log_threshold.exp(), self.decoder_norms().sum(-1).detach()
            with torch.no_grad():
                keep = sparse.keep_mask(pre, threshold, self.jumprelu_bandwidth, norm_sum)
            if self.use_sparse(keep.sum().item() / B):
                active, recon = sparse.threshold_forward(x, pre, keep, self.W_enc, self.b_enc, self.W_dec,
                                                         self.b_dec, threshold, self.jumprelu_bandwidth, norm_sum)
                return CrosscoderOutput(latents=active.dense(B, self.d_sae), recon=recon, pre_acts=pre.detach(),
                                        active=active)
        latents = self.activate(pre)
        return CrosscoderOutput(latents=latents, recon=self.decode(latents), pre_acts=pre)

    def _forward_paper(self, x: torch.Tensor) -> CrosscoderOutput:
        """The paper's code (Ge et al. 2026): one JumpReLU gate per snapshot on pre * ||W_dec[i, s]||, with
        one learned threshold per latent shared by the snapshots, so a latent can be on at some snapshots
        and off at others. f[b, s, i] = pre[b, i] * H(pre[b, i] * ||W_dec[i, s]|| - t_i).

        Three implementations, equal within float32 rounding (tests/test_sparse_paper.py, tests/test_paper_loop.py),
        none of which forms a [B, S, F] tensor; the batch's own density picks one:
        - sparse, window listed: the (token, snapshot, latent) entries open or inside the threshold's
          straight-through window (crosscoder/sparse.py), when the candidates for them are at most
          PAPER_MAX_CANDIDATES of the latents per token;
        - sparse, window passed: the open entries only, and the closed window entries' threshold gradient from one
          GEMM per snapshot (crosscoder/paper_loop.py), when the window is too wide to list (the paper's bandwidth
          of 2) but few entries are open;
        - dense, snapshot by snapshot (crosscoder/paper_loop.py): dense GEMMs, memory O(B F), for dense codes
          (the recipe's start: about a third of the entries open at initialisation)."""
        pre = self.encode_pre(x)  # [B, F]
        B, S, F_ = x.shape[0], self.n_snapshots, self.d_sae
        threshold, bw, c = self.log_threshold.exp(), self.jumprelu_bandwidth, self.tanh_c
        with torch.no_grad():
            norms = self.decoder_norms()  # [F, S]
        gates = (norms, threshold.detach())
        if self.sparse is not False:
            with torch.no_grad():
                most = sparse.PAPER_MAX_CANDIDATES * F_ * B
                cand = sparse.paper_candidates(pre, norms, threshold, bw)
                listed = torch.count_nonzero(cand).item() <= most
                if not listed:  # candidates for the open entries alone
                    cand = sparse.paper_candidates(pre, norms, threshold, 0.0)
                entries = None
                if listed or self.sparse or torch.count_nonzero(cand).item() <= most:
                    entries = sparse.paper_entries(pre, norms, threshold, bw, cand, window_entries=listed)
            if entries is not None and self.use_sparse(len(entries.rows) / (B * S)):
                active, recon, latents, sums = sparse.paper_forward(
                    x, entries, self.W_enc, self.b_enc, self.W_dec, self.b_dec, threshold, norms, bw, c,
                    window_pass=None if listed else pre.detach())
                return CrosscoderOutput(latents=latents, recon=recon, pre_acts=pre.detach(), active=active,
                                        penalty_sums=sums, snapshot_gates=gates)
        recon, sums, latents = paper_loop.paper_dense(pre, self.W_dec, threshold, bw, c)
        return CrosscoderOutput(latents=latents, recon=recon + self.b_dec, pre_acts=pre, penalty_sums=sums,
                                snapshot_gates=gates)

    def loss_terms(self, x: torch.Tensor, out: CrosscoderOutput) -> LossTerms:
        mse = (out.recon - x).pow(2).sum(dim=(1, 2)).mean()
        if self.activation == "paper":
            # "tanh-quad": p_i = mean over tokens and snapshots of tanh(c * f_i^s * ||W_dec[i, s]||);
            # penalty = sum_i p_i (1 + p_i / s), which punishes latents that fire often much harder.
            p = out.penalty_sums / (x.shape[0] * self.n_snapshots)
            return LossTerms(mse=mse, sparsity=(p * (1 + p / self.tanh_s)).sum(),
                             l0=torch.count_nonzero(out.latents).to(x.dtype) / x.shape[0])  # latents: pre > 0 or 0
        dec_norm_sum = self.decoder_norms().sum(-1)  # [F]
        if out.active is not None:  # the sparse paths: the same sums over the active entries only
            a, B = out.active, x.shape[0]
            if self.activation == "jumprelu":  # the gates of those entries; the rest are closed, outside the window
                g = out.pre_acts[a.rows, a.cols] * dec_norm_sum.detach()[a.cols]
                sparsity = _step_ste(g, self.log_threshold.exp()[a.cols], self.jumprelu_bandwidth).sum() / B
            else:
                sparsity = (a.values * dec_norm_sum[a.cols]).sum() / B
            return LossTerms(mse=mse, sparsity=sparsity, l0=(a.values > 0).sum().to(x.dtype) / B)
        active = (out.latents > 0).to(x.dtype)
        if self.activation == "jumprelu":
            # L0 penalty: the number of open gates H(pre * sum_s ||W_dec[i, s]|| - t). It is a count, so rescaling a
            # latent (W_enc, b_enc x c, W_dec / c) cannot lower it; the step's straight-through gradient is what
            # trains the thresholds (and the only gradient this term gives).
            gates = _step_ste(out.pre_acts * dec_norm_sum.detach(), self.log_threshold.exp(), self.jumprelu_bandwidth)
            sparsity = gates.sum(-1).mean()
        else:
            sparsity = (out.latents * dec_norm_sum).sum(-1).mean()
        return LossTerms(mse=mse, sparsity=sparsity, l0=active.sum(-1).mean())

    # ---- export -----------------------------------------------------------------------------------
    def config(self) -> dict:
        return dict(n_snapshots=self.n_snapshots, d_model=self.d_model, d_sae=self.d_sae,
                    activation=self.activation, k=self.k, jumprelu_bandwidth=self.jumprelu_bandwidth,
                    tanh_c=self.tanh_c, tanh_s=self.tanh_s,
                    snapshot_names=self.snapshot_names)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``crosscoder.safetensors`` (weights, ``scale`` and the config as metadata) atomically."""
        from safetensors.torch import save_file
        path = Path(run_dir) / WEIGHTS_NAME
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"config": json.dumps(self.config()), "version": str(self._version)})
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> "Crosscoder":
        """Load from a run directory (or the .safetensors file itself)."""
        from safetensors import safe_open
        path = Path(run_dir)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no crosscoder weights here (expected {WEIGHTS_NAME} in the run directory)")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            config = json.loads(metadata["config"])
            state = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
        state._metadata = {"": {"version": int(metadata.get("version", 1))}}  # files before version 2 had none
        model = cls(**config).to(device)
        model.load_state_dict(state)
        return model
