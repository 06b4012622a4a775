"""Fast path for TopK crosscoders: decode, and the backward through decoder and encoder, over active latents only.

With k active latents of F per token, the dense step spends 10*B*S*D*F FLOPs, of which only the encoder's
forward (2*B*S*D*F) needs every latent (to rank them). Here the decoder is an ``embedding_bag`` over the k
active rows of W_dec (2*B*k*S*D, and its backward touches only those rows), and the encoder's weight
gradient is a sparse [F, B] x [B, S*D] product with B*k non-zeros. Results equal the dense path within
float32 rounding (tests/test_sparse.py); ``Crosscoder`` switches to it by itself where it wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _TopKEncode(torch.autograd.Function):
    """values [B, k], indices [B, k] of the top-k latents by relu(pre) * weight; pre = x W_enc + b_enc."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, weight, k):
        pre = torch.addmm(b_enc, x_flat, W_enc_flat)
        post = torch.relu(pre)
        idx = (post * weight).topk(k, dim=-1).indices
        values = post.gather(-1, idx)
        ctx.save_for_backward(x_flat, idx, values)
        ctx.F = W_enc_flat.shape[1]
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        x_flat, idx, values = ctx.saved_tensors
        B, k = idx.shape
        # relu's gradient on the selected entries, in the dtype of the (fp32 master) weights under autocast
        g = (grad_values * (values > 0)).reshape(-1).to(x_flat.dtype)
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        grad_pre = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g, (ctx.F, B), check_invariants=False)
        grad_W = torch.sparse.mm(grad_pre, x_flat).t()  # [S*D, F] from B*k non-zeros
        grad_b = torch.zeros(ctx.F, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g)
        return None, grad_W, grad_b, None, None


def topk_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, S, D] -> (values [B, k], indices [B, k], reconstruction [B, S, D])."""
    B, S, D = x.shape
    F_ = W_dec.shape[0]
    weight = W_dec.detach().norm(dim=-1).sum(-1)  # ranking only: no gradient, as in the dense path
    values, idx = _TopKEncode.apply(x.reshape(B, -1), W_enc.reshape(-1, F_), b_enc, weight, k)
    # embedding_bag has no autocast rule: decode in the weights' dtype
    recon = F.embedding_bag(idx, W_dec.reshape(F_, -1), per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return values, idx, recon.view(B, S, D) + b_dec


def sparse_wins(d_sae: int, k: int) -> bool:
    """Where the sparse path is faster than dense GEMMs (bench/step.py): when few latents are active."""
    return d_sae >= 16 * k
