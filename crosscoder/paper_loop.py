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


def _dense_forward_snapshot(pre: torch.Tensor, norm: torch.Tensor, threshold: torch.Tensor, c: float,
                            any_open: torch.Tensor, dtype: torch.dtype):
    """One snapshot's element-wise forward: (its code f [B, F] in the GEMM's dtype, the penalty's sums over tokens
    of tanh(c f ||W_dec[i, s]||) [F], any_open | open)."""
    open_ = pre * norm > threshold
    f = pre * open_.to(pre.dtype)
    return f.to(dtype), torch.tanh(c * (f * norm)).sum(0), any_open | open_


def _dense_backward_snapshot(pre: torch.Tensor, norm: torch.Tensor, threshold: torch.Tensor, bandwidth: float,
                             c: float, grad_code: torch.Tensor, grad_sums: torch.Tensor, grad_pre: torch.Tensor,
                             dtype: torch.dtype):
    """One snapshot's element-wise backward, given grad_code = grad_recon_s W_dec[:, s]^T [B, F] (the reconstruction's
    part of dL/df) and grad_sums [F]: (grad_pre + this snapshot's part, the threshold's straight-through gradient [F]
    as _JumpStep gives it, dL/d||W_dec[i, s]|| [F] from the penalty, the code f in the GEMM's dtype for W_dec's
    gradient)."""
    g = pre * norm
    open_, window = g > threshold, (g - threshold).abs() < bandwidth / 2
    f = pre * open_.to(pre.dtype)
    dtanh = 1 - torch.tanh(c * (f * norm)).pow(2)
    gf = grad_code.to(pre.dtype) + grad_sums * (c * norm) * dtanh  # dL/df
    grad_t = (-(gf * pre) * window.to(pre.dtype) / bandwidth).sum(0)
    grad_norm = grad_sums * (c * f * dtanh).sum(0)
    return grad_pre + gf * open_.to(pre.dtype), grad_t, grad_norm, f.to(dtype)


def _cuda_compiled(fn):
    """fn, fused by torch.compile when its first tensor is on CUDA (one kernel instead of a dozen passes over [B, F]);
    on CPU, or once compiling has failed, the eager fn (the same expressions)."""
    state = {}

    def run(*args):
        if args[0].is_cuda and not state.get("failed"):
            try:
                compiled = state.setdefault("fn", torch.compile(fn, dynamic=False))
                return compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same eager expressions
                import warnings
                warnings.warn(f"torch.compile of {fn.__name__} failed, running it eagerly: {err}")
                state["failed"] = True
        return fn(*args)
    run.eager = fn
    return run


dense_forward_snapshot = _cuda_compiled(_dense_forward_snapshot)
dense_backward_snapshot = _cuda_compiled(_dense_backward_snapshot)


class _PaperDense(torch.autograd.Function):
    """(recon [B, S, D] without b_dec, penalty sums [F] = sum over tokens and snapshots of tanh(c f ||W_dec[i, s]||),
    latents [B, F] = pre where open at some snapshot, else 0 (no gradient)) from pre [B, F], W_dec [F, S, D] and the
    threshold [F]. The backward recomputes each snapshot's gates and code. Per snapshot the element-wise work is one
    function each way (compiled into one kernel on CUDA) around the snapshot's GEMMs."""

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
            f, tanh_sum, any_open = dense_forward_snapshot(pre, norms[:, s], threshold, c, any_open, dtype or pre.dtype)
            recon[:, s] = f @ W_dec[:, s].to(f.dtype)
            sums += tanh_sum
        ctx.save_for_backward(pre, W_dec, threshold, norms)
        ctx.bandwidth, ctx.c, ctx.dtype = bandwidth, c, dtype
        latents = torch.where(any_open, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        ctx.mark_non_differentiable(latents)
        return recon, sums, latents

    @staticmethod
    def backward(ctx, grad_recon, grad_sums, _grad_latents):
        pre, W, threshold, norms = ctx.saved_tensors
        eps, c, dtype = ctx.bandwidth, ctx.c, ctx.dtype or pre.dtype
        B, S, D = grad_recon.shape if grad_recon is not None else (pre.shape[0], W.shape[1], W.shape[2])
        grad_pre = torch.zeros_like(pre)
        grad_t = torch.zeros_like(threshold)
        grad_W = torch.empty_like(W)
        grad_sums = torch.zeros_like(threshold) if grad_sums is None else grad_sums
        for s in range(S):
            n, w = norms[:, s], W[:, s]
            gr = (grad_recon[:, s] if grad_recon is not None else pre.new_zeros(B, D)).to(dtype)
            grad_code = gr @ w.T.to(dtype)  # [B, F]
            grad_pre, dt, grad_n, f = dense_backward_snapshot(pre, n, threshold, eps, c, grad_code, grad_sums,
                                                              grad_pre, dtype)
            grad_t += dt
            coef = torch.where(n > 0, grad_n / n, torch.zeros_like(n))  # d||w|| / dw = w / ||w||
            grad_W[:, s] = (f.T @ gr).to(W.dtype) + coef[:, None] * w
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


# On CUDA one fused kernel: it reads pre (4 bytes per element) and writes the result (2 in bf16) once per snapshot,
# where the eager version moves ~40 bytes per element in five kernels; at the paper's shape that pass is 1.3e10
# elements per step (docs/PERFORMANCE.md, "Scale model"). A fused multiply-add on the GPU may round g - t differently
# in the last bit, which moves an entry exactly at the window's edge: no measurable effect.
closed_window_pre = _cuda_compiled(_closed_window_pre)


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
