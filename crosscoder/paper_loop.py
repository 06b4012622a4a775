"""The paper activation without [B, S, F] tensors, snapshot by snapshot: memory O(B*F) at any density.

f[b, s, i] = pre[b, i] * H(pre[b, i] * ||W_dec[i, s]|| - t_i) (crosscoder/model.py, ``_forward_paper``) is, written
out, a [B, S, F] tensor; with its gates, penalty and their copies for the backward the old dense step held ~26 bytes
per element: 335 GB for the paper's batch (4,096 tokens, 32 snapshots, 98,304 latents). Here each snapshot's [B, F]
slice is formed, used and dropped, in the forward and again (recomputed, like activation checkpointing) in the
backward, so the step holds a few [B, F] tensors (1.6 GB each at that shape) whatever the window and density.

Two autograd functions:

- ``paper_dense``: the whole activation, decoder and tanh-quad penalty sums, dense GEMMs per snapshot. The path for
  dense codes (the first steps of the paper's recipe, when a third of the entries are open).
- ``closed_window_pass``: the threshold's straight-through gradient from the entries that are CLOSED but inside its
  window |g - t| < bandwidth / 2, for the sparse path (crosscoder/sparse.py) when that window is too wide to list
  its entries (the paper's bandwidth of 2 holds nearly every entry). Such an entry has value 0, so it changes
  neither the reconstruction nor the penalty; it only needs dL/df there, which is grad_recon_s . W_dec[i, s] plus
  the penalty's c ||W_dec[i, s]|| dL/dsum_i (tanh'(0) = 1). Summed over tokens that is one GEMM per snapshot,
  (pre masked to the entries)^T [F, B] x grad_recon_s [B, D], then a row-wise dot with W_dec[:, s]: 2 B S D F
  FLOPs and one element-wise pass over [B, S, F], instead of the dense step's 10 B S D F and ~30 passes.

Both use the dense path's own float32 expressions for the gates (g = pre * norm, g > t, |g - t| < bandwidth / 2),
so the sets of open and window entries are the same bits; tests/test_paper_loop.py checks every output and
gradient against the [B, S, F] formulas.
"""

from __future__ import annotations

import torch


def _gemm_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives GEMMs here (None: autocast off). Custom functions' backward runs outside autocast, so
    the forward records it and the backward casts its GEMM operands the same way."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b in ``dtype`` (as autocast would run it; None: in a's dtype), result in a's dtype."""
    if dtype is None:
        return a @ b.to(a.dtype)
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def _gates(pre: torch.Tensor, norm: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
    """(open, window) [B, F] of one snapshot, with the dense path's expressions (model.py ``_JumpStep``)."""
    g = pre * norm
    return g > threshold, (g - threshold).abs() < bandwidth / 2


class _PaperDense(torch.autograd.Function):
    """(recon [B, S, D] without b_dec, penalty sums [F] = sum over tokens and snapshots of tanh(c f ||W_dec[i, s]||),
    latents [B, F] = pre where open at some snapshot, else 0 (no gradient)) from pre [B, F], W_dec [F, S, D] and the
    threshold [F]. The backward recomputes each snapshot's gates and code."""

    @staticmethod
    def forward(ctx, pre, W_dec, threshold, bandwidth, c):
        B, F_ = pre.shape
        _, S, D = W_dec.shape
        dtype = _gemm_dtype(pre.device.type)
        norms = W_dec.detach().norm(dim=-1)  # [F, S]
        recon = torch.empty(B, S, D, dtype=pre.dtype, device=pre.device)
        sums = torch.zeros(F_, dtype=pre.dtype, device=pre.device)
        any_open = torch.zeros(B, F_, dtype=torch.bool, device=pre.device)
        for s in range(S):
            n = norms[:, s]
            open_, _ = _gates(pre, n, threshold, bandwidth)
            f = pre * open_.to(pre.dtype)
            recon[:, s] = _mm(f, W_dec[:, s], dtype)
            sums += torch.tanh(c * (f * n)).sum(0)
            any_open |= open_
        ctx.save_for_backward(pre, W_dec, threshold, norms)
        ctx.bandwidth, ctx.c, ctx.dtype = bandwidth, c, dtype
        latents = torch.where(any_open, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        ctx.mark_non_differentiable(latents)
        return recon, sums, latents

    @staticmethod
    def backward(ctx, grad_recon, grad_sums, _grad_latents):
        pre, W, threshold, norms = ctx.saved_tensors
        eps, c, dtype = ctx.bandwidth, ctx.c, ctx.dtype
        S = W.shape[1]
        grad_pre = torch.zeros_like(pre)
        grad_t = torch.zeros_like(threshold)
        grad_W = torch.zeros_like(W)
        for s in range(S):
            n = norms[:, s]
            open_, window = _gates(pre, n, threshold, eps)
            f = pre * open_.to(pre.dtype)
            gf = torch.zeros_like(pre)  # dL/df[:, s]
            if grad_recon is not None:
                gr = grad_recon[:, s].to(pre.dtype)
                gf = _mm(gr, W[:, s].T, dtype)
                grad_W[:, s] = _mm(f.T, gr, dtype)
            if grad_sums is not None:
                dtanh = 1 - torch.tanh(c * (f * n)).pow(2)
                gf += grad_sums * (c * n) * dtanh
                grad_n = grad_sums * (c * f * dtanh).sum(0)  # dL/d||W_dec[i, s]||
                coef = torch.where(n > 0, grad_n / n, torch.zeros_like(n))
                grad_W[:, s] += coef[:, None] * W[:, s]
            grad_pre += gf * open_.to(gf.dtype)
            grad_t += (-(gf * pre) * window.to(gf.dtype) / eps).sum(0)  # as _JumpStep.backward
        return grad_pre, grad_W, grad_t, None, None


def paper_dense(pre: torch.Tensor, W_dec: torch.Tensor, threshold: torch.Tensor, bandwidth: float,
                c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recon [B, S, D] without b_dec, penalty sums [F], latents [B, F]); see ``_PaperDense``."""
    return _PaperDense.apply(pre, W_dec, threshold, bandwidth, c)


def _closed_window_pre(pre: torch.Tensor, norm: torch.Tensor, threshold: torch.Tensor, half_bandwidth: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """[B, F] in ``dtype``: pre at the entries closed but inside the window, -bandwidth / 2 < g - t <= 0 with
    g = pre * norm (``_gates``: g > t is open, |g - t| < bandwidth / 2 the window), else 0."""
    d = pre * norm - threshold
    return torch.where((d > -half_bandwidth) & (d <= 0), pre, 0.0).to(dtype)


_compiled = {}


def closed_window_pre(pre: torch.Tensor, norm: torch.Tensor, threshold: torch.Tensor, half_bandwidth: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """``_closed_window_pre``, fused into one kernel by torch.compile on CUDA: it reads pre (4 bytes per element) and
    writes the result (2 in bf16) once per snapshot, where the eager version moves ~40 bytes per element in five
    kernels; at the paper's shape that pass is 1.3e10 elements per step (docs/PERFORMANCE.md, "Scale model").
    On CPU, or if compiling fails, the eager version (same expressions; a fused multiply-add on the GPU may round
    g - t differently in the last bit, which moves an entry exactly at the window's edge: no measurable effect)."""
    if pre.is_cuda and _compiled.get("failed") is None:
        try:
            fn = _compiled.setdefault("fn", torch.compile(_closed_window_pre, dynamic=False))
            return fn(pre, norm, threshold, half_bandwidth, dtype)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same eager expressions
            import warnings
            warnings.warn(f"torch.compile of the paper's window pass failed, running it eagerly: {err}")
            _compiled["failed"] = True
    return _closed_window_pre(pre, norm, threshold, half_bandwidth, dtype)


class _ClosedWindowPass(torch.autograd.Function):
    """Identity on (recon, sums); its backward adds to the threshold the straight-through gradient of the closed
    entries inside the window, which the sparse path does not list (module docstring)."""

    @staticmethod
    def forward(ctx, recon, sums, threshold, pre, norms, W_dec, bandwidth, c):
        ctx.save_for_backward(threshold, pre, norms, W_dec)
        ctx.bandwidth, ctx.c, ctx.dtype = bandwidth, c, _gemm_dtype(recon.device.type)
        return recon.clone(), sums.clone()

    @staticmethod
    def backward(ctx, grad_recon, grad_sums):
        threshold, pre, norms, W = ctx.saved_tensors
        eps, c, dtype = ctx.bandwidth, ctx.c, ctx.dtype or pre.dtype
        B, D = pre.shape[0], W.shape[2]
        grad_t = torch.zeros_like(threshold)
        for s in range(W.shape[1]):
            n = norms[:, s]
            masked = closed_window_pre(pre, n, threshold, eps / 2, dtype)  # [B, F]
            # one GEMM gives both sums over tokens: masked^T [grad_recon_s | 1] = [sum_b masked grad_recon_s | sum_b masked]
            # (7 zero columns more keep the width a multiple of 8, as tensor-core GEMMs want)
            right = torch.zeros(B, D + 8, dtype=dtype, device=pre.device)
            right[:, D] = 1
            if grad_recon is not None:
                right[:, :D] = grad_recon[:, s]
            A = (masked.T @ right).to(pre.dtype)  # [F, D + 8]
            dgate = torch.zeros_like(threshold)  # sum over tokens of dL/df * pre at the closed window entries
            if grad_recon is not None:
                dgate += (A[:, :D] * W[:, s]).sum(-1)
            if grad_sums is not None:
                dgate += grad_sums * (c * n) * A[:, D]  # tanh'(0) = 1: dL/df = dL/dsum_i c ||W_dec[i, s]||
            grad_t -= dgate / eps
        return grad_recon, grad_sums, grad_t, None, None, None, None, None


def closed_window_pass(recon: torch.Tensor, sums: torch.Tensor, threshold: torch.Tensor, pre: torch.Tensor,
                       norms: torch.Tensor, W_dec: torch.Tensor, bandwidth: float,
                       c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, sums) unchanged; in the backward, the closed window entries' gradient for ``threshold``. pre [B, F],
    norms [F, S] and W_dec [F, S, D] are read without gradient."""
    return _ClosedWindowPass.apply(recon, sums, threshold, pre.detach(), norms.detach(), W_dec.detach(),
                                   bandwidth, c)
