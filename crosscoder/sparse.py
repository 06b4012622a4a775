"""Fast paths for sparse codes: decode, and the backward through decoder and encoder, over active latents only.

With N active (token, latent) entries in a batch of B tokens, the dense step spends 10*B*S*D*F FLOPs, of
which only the encoder's forward (2*B*S*D*F) needs every latent (to rank them for TopK, to find the open
ones for relu / JumpReLU). Here the decoder is an ``embedding_bag`` over the active rows of W_dec (2*N*S*D,
and its backward touches only those rows), and the encoder's weight gradient a sparse [F, B] x [B, S*D]
product with N non-zeros. Results equal the dense path within float32 rounding (tests/test_sparse.py);
``Crosscoder`` switches to them by itself where they win (``sparse_wins``, measured with bench/step.py).

TopK has k entries per token. relu and JumpReLU have a variable number per token (an ``embedding_bag`` with
offsets); a token may have none. For JumpReLU the entries also include those inside the threshold's
straight-through window that are closed (value 0): the dense path gives them a threshold gradient, so
they stay in the set and their gradient w.r.t. the (zero) value is what that gradient needs.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Where the sparse step beats the dense one: at most this fraction of latents active per token. Measured with
# relu (bench/step.py, docs/PERFORMANCE.md section 1): the two steps take the same time at about 1/20 of the
# latents (S=8 D=768 F=16384) and 1/24 (S=8 D=128 F=4096); at 1/32 sparse is 1.34x and 1.04x faster.
MAX_DENSITY = 1 / 32


class Active(NamedTuple):
    """The active entries of a batch's code, token by token (``rows`` ascending)."""

    rows: torch.Tensor  # [N] token of each entry
    cols: torch.Tensor  # [N] latent of each entry
    values: torch.Tensor  # [N] its activation f[row, col] (0 for JumpReLU entries kept for the threshold window)
    offsets: torch.Tensor  # [B] position in rows / cols / values of each token's first entry

    def dense(self, B: int, F_: int) -> torch.Tensor:
        """The code as dense latents [B, F] (differentiable w.r.t. ``values``)."""
        zeros = torch.zeros(B, F_, dtype=self.values.dtype, device=self.values.device)
        return zeros.index_put_((self.rows, self.cols), self.values)


def sparse_wins(d_sae: int, active_per_token: float) -> bool:
    """Whether the sparse path is faster than dense GEMMs for a code with this many active latents per token."""
    return active_per_token <= MAX_DENSITY * d_sae


def _encoder_grads(x_flat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor,
                   n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of W_enc [S*D, F] and b_enc [F] from grad_pre, given as its N non-zeros g at (rows, cols).

    grad_W = x^T grad_pre is formed as the CSR product grad_pre^T [F, B] x [B, S*D] written column-major, i.e.
    straight into the [S*D, F] layout of W_enc: a row-major product needs a transposing copy of 4*S*D*F bytes
    afterwards (profiled: 0.67 vs 0.46 s at S*D=6144, F=16384, N=32768).
    """
    g = g.to(x_flat.dtype)  # under autocast: in the dtype of the (fp32 master) weights
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.bincount(cols, minlength=n_latents).cumsum(0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        grad_pre_t = torch.sparse_csr_tensor(crow, rows[order], g[order], (n_latents, x_flat.shape[0]),
                                             check_invariants=False)
    grad_W = torch.empty(x_flat.shape[1], n_latents, dtype=x_flat.dtype, device=x_flat.device)
    torch.addmm(grad_W.t(), grad_pre_t, x_flat, beta=0, out=grad_W.t())
    grad_b = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    return grad_W, grad_b


def _offsets(rows: torch.Tensor, B: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=B)
    return torch.cumsum(counts, 0) - counts


class _TopKEncode(torch.autograd.Function):
    """values [B, k], indices [B, k] of the top-k latents by relu(pre) * weight, and pre [B, F] (no gradient);
    pre = x W_enc + b_enc."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, weight, k):
        pre = torch.addmm(b_enc, x_flat, W_enc_flat)
        post = torch.relu(pre)
        idx = (post * weight).topk(k, dim=-1).indices
        values = post.gather(-1, idx)
        ctx.save_for_backward(x_flat, idx, values)
        ctx.n_latents = pre.shape[1]
        ctx.mark_non_differentiable(idx, pre)
        return values, idx, pre

    @staticmethod
    def backward(ctx, grad_values, _grad_idx, _grad_pre):
        x_flat, idx, values = ctx.saved_tensors
        B, k = idx.shape
        g = (grad_values * (values > 0)).reshape(-1)  # relu's gradient on the selected entries
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        grad_W, grad_b = _encoder_grads(x_flat, rows, idx.reshape(-1), g, ctx.n_latents)
        return None, grad_W, grad_b, None, None


class _ThresholdEncode(torch.autograd.Function):
    """The entries of relu(pre) (``threshold`` None) or JumpReLU's pre * H(pre - t) selected by ``keep``, with
    the dense path's backward restricted to them. pre [B, F] comes in computed (without gradient)."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, threshold, pre, keep, bandwidth):
        rows, cols = keep.nonzero(as_tuple=True)
        p = pre[rows, cols]
        values = p if threshold is None else p * (p > threshold[cols]).to(p.dtype)
        ctx.save_for_backward(x_flat, rows, cols, p, threshold)
        ctx.n_latents, ctx.bandwidth = pre.shape[1], bandwidth
        ctx.mark_non_differentiable(rows, cols)
        return values, rows, cols

    @staticmethod
    def backward(ctx, grad_values, _grad_rows, _grad_cols):
        x_flat, rows, cols, p, threshold = ctx.saved_tensors
        grad_t = None
        if threshold is None:  # relu: every kept entry is open
            g = grad_values
        else:  # as _JumpReLU.backward in model.py, entry by entry
            t, eps = threshold[cols], ctx.bandwidth
            g = grad_values * (p > t).to(grad_values.dtype)
            window = ((p - t).abs() < eps / 2).to(grad_values.dtype)
            grad_t = torch.zeros_like(threshold).index_add_(0, cols, (-grad_values * t / eps * window).to(threshold.dtype))
        grad_W, grad_b = _encoder_grads(x_flat, rows, cols, g, ctx.n_latents)
        return None, grad_W, grad_b, grad_t, None, None, None


def decode(active: Active, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """a_hat [B, S, D] = sum over a token's entries of value * W_dec[col] + b_dec (embedding_bag, mode sum)."""
    F_, S, D = W_dec.shape
    # embedding_bag has no autocast rule: decode in the weights' dtype
    recon = F.embedding_bag(active.cols, W_dec.reshape(F_, -1), active.offsets, mode="sum",
                            per_sample_weights=active.values.to(W_dec.dtype))
    return recon.view(-1, S, D) + b_dec


def topk_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, k: int) -> tuple[Active, torch.Tensor, torch.Tensor]:
    """x [B, S, D] -> (active entries, k per token; reconstruction [B, S, D]; pre-activations [B, F])."""
    B = x.shape[0]
    F_ = W_dec.shape[0]
    weight = W_dec.detach().norm(dim=-1).sum(-1)  # ranking only: no gradient, as in the dense path
    values, idx, pre = _TopKEncode.apply(x.reshape(B, -1), W_enc.reshape(-1, F_), b_enc, weight, k)
    rows = torch.arange(B, device=x.device).repeat_interleave(k)
    active = Active(rows, idx.reshape(-1), values.reshape(-1), torch.arange(0, B * k, k, device=x.device))
    return active, decode(active, W_dec, b_dec), pre


def keep_mask(pre: torch.Tensor, threshold: torch.Tensor | None, bandwidth: float) -> torch.Tensor:
    """[B, F] the entries whose value or gradient can be non-zero: relu's open ones (pre > 0); for JumpReLU the
    open ones and those in the threshold's window, |pre - t| < bandwidth / 2: together pre - t > -bandwidth / 2."""
    if threshold is None:
        return pre > 0
    return (pre - threshold) > -(bandwidth / 2)


def threshold_forward(x: torch.Tensor, pre: torch.Tensor, keep: torch.Tensor, W_enc: torch.Tensor,
                      b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                      threshold: torch.Tensor | None, bandwidth: float) -> tuple[Active, torch.Tensor]:
    """relu (threshold None) or JumpReLU over the entries of ``keep_mask``: (active entries, reconstruction).

    pre [B, F] is x W_enc + b_enc, already computed; only the gradient flows through here."""
    B = x.shape[0]
    values, rows, cols = _ThresholdEncode.apply(x.reshape(B, -1), W_enc.reshape(-1, W_dec.shape[0]), b_enc,
                                                threshold, pre.detach(), keep, bandwidth)
    active = Active(rows, cols, values, _offsets(rows, B))
    return active, decode(active, W_dec, b_dec)
