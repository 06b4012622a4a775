"""Fast paths for sparse codes: decode, and the backward through decoder and encoder, over active latents only.

With N active (token, latent) entries in a batch of B tokens, the dense step spends 10*B*S*D*F FLOPs, of
which only the encoder's forward (2*B*S*D*F) needs every latent (to rank them for TopK, to find the open
ones for relu / JumpReLU). Here the decoder is an ``embedding_bag`` over the active rows of W_dec (2*N*S*D,
and its backward touches only those rows), and the encoder's weight gradient a sparse [F, B] x [B, S*D]
product with N non-zeros. Results equal the dense path within float32 rounding (tests/test_sparse.py);
``Crosscoder`` switches to them by itself where they win (``sparse_wins``, measured with bench/step.py).

TopK has k entries per token. relu and JumpReLU have a variable number per token (an ``embedding_bag`` with
offsets); a token may have none. For JumpReLU (gated on pre * sum_s ||W_dec[i, s]||) the entries also include
those inside the threshold's straight-through window that are closed (value 0): the dense path gives them a threshold gradient, so
they stay in the set and their gradient w.r.t. the (zero) value is what that gradient needs.

The paper activation (one JumpReLU gate per snapshot) has (token, snapshot, latent) entries: open, or closed inside
the threshold's window. Its decoder is one bag per (token, snapshot) over rows W_dec[i, s], its tanh-quad penalty
sums over the entries (a closed entry adds tanh(0) = 0), and nothing of shape [B, S, F] is formed (see below).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from crosscoder.paper_loop import closed_window_pass

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
    """The entries of relu(pre) (``threshold`` None) or JumpReLU's pre * H(pre * n - t) (n = ``norm_sum``, the
    decoder-norm sums, without gradient) selected by ``keep``, with the dense path's backward restricted to them.
    pre [B, F] comes in computed (without gradient)."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, threshold, pre, keep, bandwidth, norm_sum):
        rows, cols = keep.nonzero(as_tuple=True)
        p = pre[rows, cols]
        open_ = window = None
        if threshold is None:
            values = p
        else:  # the gate as _JumpReLU.forward in model.py computes it, entry by entry
            g, t = p * norm_sum[cols], threshold[cols]
            open_, window = g > t, (g - t).abs() < bandwidth / 2
            values = p * open_.to(p.dtype)
        ctx.save_for_backward(x_flat, rows, cols, p, threshold, open_, window)
        ctx.n_latents, ctx.bandwidth = pre.shape[1], bandwidth
        ctx.mark_non_differentiable(rows, cols)
        return values, rows, cols

    @staticmethod
    def backward(ctx, grad_values, _grad_rows, _grad_cols):
        x_flat, rows, cols, p, threshold, open_, window = ctx.saved_tensors
        grad_t = None
        if threshold is None:  # relu: every kept entry is open
            g = grad_values
        else:  # as _JumpReLU.backward in model.py, entry by entry
            g = grad_values * open_.to(grad_values.dtype)
            grad_t = torch.zeros_like(threshold).index_add_(
                0, cols, (-grad_values * p * window.to(grad_values.dtype) / ctx.bandwidth).to(threshold.dtype))
        grad_W, grad_b = _encoder_grads(x_flat, rows, cols, g, ctx.n_latents)
        return None, grad_W, grad_b, grad_t, None, None, None, None


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


def keep_mask(pre: torch.Tensor, threshold: torch.Tensor | None, bandwidth: float,
              norm_sum: torch.Tensor | None = None) -> torch.Tensor:
    """[B, F] the entries whose value or gradient can be non-zero: relu's open ones (pre > 0); for JumpReLU, whose
    gate reads g = pre * norm_sum [F], the open ones and those in the threshold's window, |g - t| < bandwidth / 2:
    together g - t > -bandwidth / 2."""
    if threshold is None:
        return pre > 0
    return (pre * norm_sum - threshold) > -(bandwidth / 2)


def threshold_forward(x: torch.Tensor, pre: torch.Tensor, keep: torch.Tensor, W_enc: torch.Tensor,
                      b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                      threshold: torch.Tensor | None, bandwidth: float,
                      norm_sum: torch.Tensor | None = None) -> tuple[Active, torch.Tensor]:
    """relu (threshold None) or JumpReLU (gated on pre * norm_sum, norm_sum [F] without gradient) over the entries
    of ``keep_mask``: (active entries, reconstruction).

    pre [B, F] is x W_enc + b_enc, already computed; only the gradient flows through here."""
    B = x.shape[0]
    values, rows, cols = _ThresholdEncode.apply(x.reshape(B, -1), W_enc.reshape(-1, W_dec.shape[0]), b_enc,
                                                threshold, pre.detach(), keep, bandwidth, norm_sum)
    active = Active(rows, cols, values, _offsets(rows, B))
    return active, decode(active, W_dec, b_dec)


# ---- the paper's activation (crosscoder=paper): one JumpReLU gate per snapshot ----------------------------------
# f[b, s, i] = pre[b, i] * H(pre[b, i] * ||W_dec[i, s]|| - t_i): the entries are (token, snapshot, latent) triples.
# They are found without a [B, S, F] tensor: a latent can only be open (or in the threshold's window) at some
# snapshot of a token if pre[b, i] passes the lowest of its S per-snapshot cut-offs, t_i / max_s ||W_dec[i, s]||
# (loosened for rounding); those candidate (token, latent) pairs alone are expanded over the S snapshots and
# tested exactly as the dense path tests them. The sparse step is tried only where the candidates are at most
# this fraction of the latents per token, so the expansion stays far below a [B, S, F] tensor.
PAPER_MAX_CANDIDATES = 1 / 8
_EXPAND_CHUNK = 1 << 22  # candidate x snapshot elements expanded at a time


class PaperActive(NamedTuple):
    """The entries of the paper activation's per-snapshot code that its value or gradient can reach: the open ones
    and (``window_listed``) the closed ones inside the threshold's straight-through window (value 0), ordered by
    (token, snapshot)."""

    rows: torch.Tensor  # [N] token
    snaps: torch.Tensor  # [N] snapshot
    cols: torch.Tensor  # [N] latent
    values: torch.Tensor  # [N] f[row, snap, col]: pre where open, 0 for window entries
    offsets: torch.Tensor  # [B * S] position of each (token, snapshot)'s first entry
    norms: torch.Tensor  # [N] ||W_dec[col, snap]||, differentiable w.r.t. W_dec (the penalty's weight)
    window_listed: bool = True  # False: the open entries only, the window's by crosscoder/paper_loop.py's pass


class PaperEntries(NamedTuple):
    """What ``paper_entries`` finds (no gradient): candidate (token, latent) pairs, the entries expanded from them."""

    cand_rows: torch.Tensor  # [C] token of each candidate pair
    cand_cols: torch.Tensor  # [C] latent of each candidate pair
    cand_pre: torch.Tensor  # [C] pre of each candidate pair
    cand: torch.Tensor  # [N] the candidate each entry came from
    rows: torch.Tensor  # [N]
    snaps: torch.Tensor  # [N]
    cols: torch.Tensor  # [N]
    pre: torch.Tensor  # [N] pre[row, col]
    open: torch.Tensor  # [N] bool: pre * ||W_dec[col, snap]|| > t
    window: torch.Tensor  # [N] bool: |pre * ||W_dec[col, snap]|| - t| < bandwidth / 2


def paper_candidates(pre: torch.Tensor, norms: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """[B, F] bool: a superset of the (token, latent) pairs open or in the window at some snapshot.

    pre [B, F]; norms [F, S] decoder norms; threshold [F]. Entry (b, s, i) is kept when g - t > -bandwidth / 2 with
    g = pre[b, i] * ||W_dec[i, s]||, i.e. pre[b, i] > (t_i - bandwidth / 2) / ||W_dec[i, s]||; the cut-off is
    loosened by 1e-4 (t + bandwidth) so that rounding cannot drop a pair the exact test keeps."""
    low = threshold - bandwidth / 2 - 1e-4 * (threshold.abs() + bandwidth)  # [F]
    inf = torch.full_like(norms, float("inf"))
    cut = torch.where(norms > 0, low[:, None] / norms, torch.where(low[:, None] < 0, -inf, inf))  # [F, S]
    return pre >= cut.amin(1)


def paper_entries(pre: torch.Tensor, norms: torch.Tensor, threshold: torch.Tensor, bandwidth: float,
                  candidates: torch.Tensor, window_entries: bool = True) -> PaperEntries:
    """The kept entries (open or in the window; open only when ``window_entries`` is False, for the closed window
    entries are then left to crosscoder/paper_loop.py's pass) of the candidate pairs, ordered by (token, snapshot,
    latent); tested with the dense path's own float32 expressions (``_JumpStep`` in model.py), so the set is
    exact. Each token's candidates are laid out padded to the most any token has, [tokens, S, M], so that ``nonzero``
    lists the entries in bag order without a sort (in blocks of tokens of at most _EXPAND_CHUNK elements)."""
    B, S = pre.shape[0], norms.shape[1]
    cand_rows, cand_cols = candidates.nonzero(as_tuple=True)
    cand_pre = pre[cand_rows, cand_cols]
    counts = torch.bincount(cand_rows, minlength=B)
    M = int(counts.max()) if B else 0
    first = torch.cumsum(counts, 0) - counts  # [B] each token's first candidate
    slot = torch.arange(M, device=pre.device)
    norms_t = norms.T.contiguous()  # [S, F]
    parts = []
    step = max(1, _EXPAND_CHUNK // max(1, S * M))
    for b0 in range(0, B if M else 0, step):
        idx = first[b0:b0 + step, None] + slot  # [n, M] candidate of each slot
        valid = slot < counts[b0:b0 + step, None]
        idx = torch.where(valid, idx, 0)
        c, p = cand_cols[idx], cand_pre[idx]  # [n, M]
        g = p[:, None, :] * norms_t[:, c].transpose(0, 1)  # [n, S, M]
        t = threshold[c][:, None, :]
        open_, window = g > t, (g - t).abs() < bandwidth / 2
        bi, si, mi = ((open_ | window if window_entries else open_) & valid[:, None, :]).nonzero(as_tuple=True)
        parts.append((idx[bi, mi], si, open_[bi, si, mi], window[bi, si, mi]))
    if parts:
        cand, snaps, open_, window = (torch.cat(q) for q in zip(*parts)) if len(parts) > 1 else parts[0]
    else:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        cand, snaps, open_, window = empty, empty, empty.bool(), empty.bool()
    return PaperEntries(cand_rows, cand_cols, cand_pre, cand, cand_rows[cand], snaps, cand_cols[cand], cand_pre[cand],
                        open_, window)


class _PaperEncode(torch.autograd.Function):
    """The entries' values pre * H(pre * ||W_dec[i, s]|| - t), with the dense path's backward restricted to them: the
    gate's straight-through estimate for the threshold (window entries, open or closed), the exact gradient for pre
    (open entries; summed over a pair's snapshots before the encoder's sparse product)."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, threshold, e: PaperEntries, bandwidth):
        values = e.pre * e.open.to(e.pre.dtype)
        ctx.save_for_backward(x_flat, threshold, e.cand_rows, e.cand_cols, e.cand, e.cols, e.pre, e.open, e.window)
        ctx.n_latents, ctx.bandwidth = W_enc_flat.shape[1], bandwidth
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x_flat, threshold, cand_rows, cand_cols, cand, cols, pre, open_, window = ctx.saved_tensors
        g = grad_values
        grad_pre = torch.zeros(len(cand_rows), dtype=g.dtype, device=g.device).index_add_(
            0, cand, g * open_.to(g.dtype))
        grad_W, grad_b = _encoder_grads(x_flat, cand_rows, cand_cols, grad_pre, ctx.n_latents)
        # as _JumpStep.backward: d/dt of the gate is -window / bandwidth, times dL/dgate = dL/df * pre
        step = -(g * pre) * window.to(g.dtype) / ctx.bandwidth
        grad_t = torch.zeros_like(threshold).index_add_(0, cols, step.to(threshold.dtype))
        return None, grad_W, grad_b, grad_t, None, None


def _per_entry_dot(grad: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, bags: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """[N] <grad[bags[e]], weight[keys[e]]>: the gradient of an embedding_bag's per-sample weights."""
    try:  # the fused kernel that embedding_bag's own backward uses (mode 0: sum)
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, weight, keys, offsets, bags, 0)
    except (AttributeError, RuntimeError, NotImplementedError):
        step = 1 << 15
        return torch.cat([(grad[bags[i:i + step]] * weight[keys[i:i + step]]).sum(-1)
                          for i in range(0, len(keys), step)]) if len(keys) else grad.new_zeros(0)


class _PaperDecode(torch.autograd.Function):
    """recon [B*S, D]: one bag per (token, snapshot) ``bags`` over the rows ``keys`` = i * S + s of W_dec [F*S, D],
    weighted by the entries' values; and the entries' decoder norms ||W_dec[i, s]|| [N] (taken from ``norms_flat``,
    computed without gradient), differentiable w.r.t. W_dec as the dense path's ``decoder_norms()``.

    Backward: W_dec's gradient is formed row by row in its own layout, one bag per row i * S + s over the entries
    that decode it (an embedding_bag over grad_recon's rows), plus the norms' term grad_n / ||w|| * w (0 where the
    norm is 0), in one pass over W_dec: no scatter into a zeroed gradient and no backward over every norm."""

    @staticmethod
    def forward(ctx, values, W_flat, norms_flat, keys, bags, offsets):
        ctx.set_materialize_grads(False)
        recon = F.embedding_bag(keys, W_flat, offsets, mode="sum", per_sample_weights=values.to(W_flat.dtype))
        norms = norms_flat[keys]
        ctx.save_for_backward(values, W_flat, keys, bags, offsets, norms)
        return recon, norms

    @staticmethod
    def backward(ctx, grad_recon, grad_norms):
        values, W, keys, bags, offsets, norms = ctx.saved_tensors
        grad_values = grad_W = None
        if grad_recon is not None:
            grad_recon = grad_recon.contiguous()
            grad_values = _per_entry_dot(grad_recon, W, keys, bags, offsets).to(values.dtype)
            order = torch.argsort(keys, stable=True)
            grad_W = F.embedding_bag(bags[order], grad_recon, _offsets(keys[order], W.shape[0]), mode="sum",
                                     per_sample_weights=values[order].to(grad_recon.dtype))
        if grad_norms is not None:
            coef = torch.where(norms > 0, grad_norms / norms, torch.zeros_like(norms))
            coef = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(0, keys, coef.to(W.dtype))
            grad_W = W * coef[:, None] if grad_W is None else grad_W.addcmul_(W, coef[:, None])
        return grad_values, grad_W, None, None, None, None


def paper_forward(x: torch.Tensor, e: PaperEntries, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor, threshold: torch.Tensor, norms: torch.Tensor, bandwidth: float, c: float,
                  window_pass: torch.Tensor | None = None
                  ) -> tuple[PaperActive, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entries with differentiable values and decoder norms; reconstruction [B, S, D]; latents [B, F] = max over
    snapshots of the code, clamped at 0, as the dense path's ``latents``: pre where open at some snapshot, else 0,
    without gradient; the tanh-quad penalty's sums [F] over the entries, sum of tanh(c f ||W_dec[i, s]||): a closed
    entry adds tanh(0) = 0). ``norms`` [F, S]: the decoder norms without gradient, as the entries were found with.

    ``window_pass``: the pre-activations [B, F] when the entries are the open ones only; the closed entries inside
    the threshold's window then get their gradient from crosscoder/paper_loop.py's pass over [B, F] per snapshot."""
    B = x.shape[0]
    F_, S, D = W_dec.shape
    values = _PaperEncode.apply(x.reshape(B, -1), W_enc.reshape(-1, F_), b_enc, threshold, e, bandwidth)
    bags = e.rows * S + e.snaps
    offsets = _offsets(bags, B * S)
    recon, entry_norms = _PaperDecode.apply(values, W_dec.reshape(F_ * S, D), norms.reshape(-1), e.cols * S + e.snaps,
                                            bags, offsets)
    sums = torch.zeros(F_, dtype=values.dtype, device=x.device).index_add(0, e.cols, torch.tanh(c * (values * entry_norms)))
    recon = recon.view(B, S, D)
    if window_pass is not None:
        recon, sums = closed_window_pass(recon, sums, threshold, window_pass, norms, W_dec, bandwidth, c)
    active = PaperActive(e.rows, e.snaps, e.cols, values, offsets, entry_norms, window_listed=window_pass is None)
    with torch.no_grad():
        any_open = torch.zeros(len(e.cand_rows), dtype=torch.bool, device=x.device).index_fill_(0, e.cand[e.open], True)
        latents = torch.zeros(B, F_, dtype=values.dtype, device=x.device).index_put_(
            (e.cand_rows[any_open], e.cand_cols[any_open]), e.cand_pre[any_open].to(values.dtype))
    return active, recon + b_dec, latents, sums
