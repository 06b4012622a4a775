"""Dead-latent revival: resampling (every activation), the pre-activation loss (JumpReLU, TopK, BatchTopK) and the
AuxK auxiliary loss (TopK / BatchTopK).

A latent is *dead for revival* once it has fired on none of the last ``window`` training tokens. The counts come
from ``FeatureFiring`` (crosscoder/metrics.py), whose state is summed over all DDP ranks at every step and is the
same on every rank, so every rank picks the same dead latents. The window defaults to the dead-feature metric's
(``dead_window_tokens``): with a quarter of it, AuxK on the synthetic set left twice as many latents dead as no AuxK.

AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section A.2): the top-``k_aux`` dead latents
of each token, ranked as the TopK code ranks (relu(pre) * sum_s ||W_dec[i, s]||), reconstruct the main code's
residual e = x - a_hat (no gradient through e); the term is

    aux = aux_coef * sum_b ||e_hat_b - e_b||^2 / sum_b ||e_b - mean_b e||^2,   e_hat_b = sum_{i in aux(b)} relu(pre_bi) W_dec[i]

the paper's normalised MSE (the residual's variance as the denominator, so the term reads as the share of the
residual the dead latents fail to explain), without b_dec. Its gradient reaches only the dead latents' encoder
columns, biases and decoder rows, which the main loss leaves untouched while they are dead. It is computed from
the [B, F] pre-activations the forward pass has anyway and decoded with an ``embedding_bag`` over the B * k_aux
entries, so the sparse TopK path stays sparse (no dense [B, F] decode, no dense encoder backward).

The pre-activation loss (Anthropic's "Circuits Updates - January 2025" adds it for every latent of a JumpReLU
dictionary; here it acts on the dead ones only, for JumpReLU, TopK and BatchTopK): preact_coef * mean_b
sum_{i dead} relu(bar - pre_bi * n_i), n_i = sum_s ||W_dec[i, s]|| (no gradient), how far each dead latent's gate
input falls short of what it must pass to fire: its threshold (JumpReLU), the token's k-th largest score (TopK),
the running batch threshold (BatchTopK). A latent the sparsity constraint has shut out gets no gradient from the
main loss; this term raises its pre-activations (and lowers a JumpReLU threshold) until it fires on its own best
tokens, then stops, the latent being alive again. Unlike resampling it moves no latent to a new direction, and
unlike AuxK it needs no structure left in the residual (on planted data the residual is noise, and AuxK revives
nothing). Its backward is a matmul over the dead columns only, on the dense and sparse paths.

Resampling (Bricken et al. 2023, "Towards Monosemanticity", and the dictionary_learning recipe): every
``resample_every`` steps each dead latent is re-initialised toward one token of the batch drawn with probability
proportional to its squared reconstruction loss: decoder row = the token's centred input (x - b_dec) scaled to
the initial decoder norm, encoder column = the same direction times 0.2 x the mean encoder norm of the living
latents, bias 0 (and a JumpReLU / paper threshold back at its initial value); its Adam moments are zeroed. TopK and
BatchTopK resample at the living latents' scale (``resample``'s ``match_living``). The firing counter is not
restarted: a resampled latent stays dead by the metric until it fires on a training token, and one that has not
by the next resampling is drawn again. Under DDP rank 0's draw is broadcast, so the ranks' weights stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy

from crosscoder.sparse import Active, _encoder_grads, _offsets, decode


def dead_mask(firing, window_tokens: int) -> torch.Tensor:
    """[F] bool: latents silent for at least ``window_tokens`` training tokens (global counts, same on every rank)."""
    return firing.since_fired >= window_tokens


class _GatherPre(torch.autograd.Function):
    """pre[rows, cols] with pre = x W_enc + b_enc given (computed without gradient): the gradient goes to W_enc and
    b_enc through the sparse product over the N entries (crosscoder/sparse.py), never through a dense [B, F]."""

    @staticmethod
    def forward(ctx, x_flat, W_enc_flat, b_enc, pre, rows, cols):
        ctx.save_for_backward(x_flat, rows, cols)
        ctx.n_latents = pre.shape[1]
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):
        x_flat, rows, cols = ctx.saved_tensors
        grad_W, grad_b = _encoder_grads(x_flat, rows, cols, grad, ctx.n_latents)
        return None, grad_W, grad_b, None, None, None


def auxk_loss(cc, x: torch.Tensor, out, dead: torch.Tensor, k_aux: int, coef: float) -> torch.Tensor:
    """The AuxK term (module docstring) for crosscoder ``cc`` on normalised x [B, S, D] and its forward ``out``;
    0 (a tensor) when no latent is dead. ``dead`` [F] bool."""
    n_dead = int(dead.sum())
    if n_dead == 0 or coef == 0:
        return x.new_zeros(())
    B, S, D = x.shape
    F_ = cc.d_sae
    k = min(k_aux, n_dead)
    pre = out.pre_acts
    with torch.no_grad():
        score = torch.relu(pre.detach()) * cc.decoder_norms().sum(-1)
        score = score.masked_fill(~dead, -1.0)  # a living latent never enters; a dead one scores >= 0
        idx = score.topk(k, dim=-1).indices  # [B, k]
    rows = torch.arange(B, device=x.device).repeat_interleave(k)
    cols = idx.reshape(-1)
    if pre.requires_grad:  # the dense paths: pre carries its graph, whose backward is dense anyway
        vals = pre[rows, cols]
    else:  # the sparse TopK path: pre came without gradient
        vals = _GatherPre.apply(x.reshape(B, -1), cc.W_enc.reshape(-1, F_), cc.b_enc, pre, rows, cols)
    vals = torch.relu(vals)
    active = Active(rows, cols, vals, _offsets(rows, B))
    e_hat = decode(active, cc.W_dec, torch.zeros((), dtype=cc.W_dec.dtype, device=x.device))  # [B, S, D], no b_dec
    e = (x - out.recon).detach().to(e_hat.dtype)
    var = (e - e.mean(0)).pow(2).sum()
    return coef * (e_hat - e).pow(2).sum() / var.clamp_min(torch.finfo(var.dtype).tiny)


def preact_loss(cc, x: torch.Tensor, out, dead: torch.Tensor, coef: float) -> torch.Tensor:
    """The pre-activation loss of the dead latents (module docstring): ``coef`` x mean over tokens of
    sum_{i dead} relu(bar - pre_bi * n_i), n_i = sum_s ||W_dec[i, s]|| (no gradient): how far each dead latent's
    gate input falls short of what it must pass to fire. The bar is the latent's own threshold t_i for jumprelu
    (trained by this term too), the token's k-th largest score relu(pre) * n for topk, and for batchtopk the
    running batch threshold (``batchtopk_threshold``, which the training forward has just updated); those two
    without gradient. 0 (a tensor) when no latent is dead; ``out`` is cc's forward on x."""
    dead_idx = dead.nonzero().squeeze(-1)
    if len(dead_idx) == 0 or coef == 0:
        return x.new_zeros(())
    B = x.shape[0]
    n_all = cc.decoder_norms().sum(-1).detach()
    if cc.activation == "jumprelu":
        bar = cc.log_threshold.exp()[dead_idx]
    elif cc.activation == "topk":
        with torch.no_grad():
            if out.active is not None:  # the sparse path kept the k winners of each token, in token order
                a = out.active
                bar = (a.values.detach() * n_all[a.cols]).view(B, cc.k).min(-1, keepdim=True).values  # [B, 1]
            else:
                bar = (torch.relu(out.pre_acts.detach()) * n_all).topk(cc.k, dim=-1).values[:, -1:]
    else:
        bar = cc.batchtopk_threshold.detach().clamp(min=0)
    # the dead columns' pre-activations again, with their own graph: the same numbers as the forward's on either
    # path, and a backward over the dead columns only ([B, n_dead], not the dense [B, F] of the whole encoder)
    pre = x.reshape(B, -1) @ cc.W_enc.reshape(-1, cc.d_sae)[:, dead_idx] + cc.b_enc[dead_idx]
    return coef * torch.relu(bar - pre * n_all[dead_idx]).sum() / B


def check_strategy(strategy, resample_every: int) -> None:
    """Resampling rewrites single rows of W_enc / W_dec and their Adam moments in place. Under FSDP those tensors are
    flat shards spread over the ranks, so the rows are not there to rewrite: refuse before training starts rather
    than fail (or corrupt a shard) at the first resampling turn."""
    if resample_every and isinstance(strategy, FSDPStrategy):
        raise ValueError(f"crosscoder.resample_every={resample_every} with trainer=fsdp: resampling rewrites rows of "
                         "W_enc / W_dec and their Adam state, which FSDP shards across ranks; set "
                         "crosscoder.resample_every=0 (experiment=paper_pythia6.9b does)")


def _reset_adam_rows(optimizer, cc, idx: torch.Tensor) -> None:
    """Zero the Adam moments (exp_avg, exp_avg_sq, max_exp_avg_sq) of latents ``idx`` in every per-latent parameter."""
    for p, dim in ((cc.W_enc, 2), (cc.b_enc, 0), (cc.W_dec, 0), (getattr(cc, "log_threshold", None), 0)):
        if p is None or p not in optimizer.state:
            continue
        for key, value in optimizer.state[p].items():
            if key != "step" and torch.is_tensor(value) and value.shape == p.shape:
                value.index_fill_(dim, idx, 0.0)


@torch.no_grad()
def resample(cc, x: torch.Tensor, dead: torch.Tensor, optimizer=None, dec_init_norm: float = 0.1,
             init_threshold: float | None = None, generator: torch.Generator | None = None,
             match_living: bool = False) -> torch.Tensor:
    """Re-initialise dead latents of ``cc`` toward high-loss tokens of x [B, S, D] (normalised); returns the indices
    [n] re-initialised (at most B, the rest wait for the next call). The same on every DDP rank: rank 0's draw is
    broadcast. ``optimizer``: the torch optimizer whose Adam moments of those latents are zeroed.

    ``match_living``: give the new latent the living latents' mean decoder and encoder norms instead of the initial
    decoder norm and 0.2 x the encoder norm. TopK needs it: a latent fires only if its score relu(pre) x sum_s
    ||W_dec[i, s]|| is among the k largest of its token, which a latent at the initial scale never is once the
    living latents have grown (measured on the synthetic set: dead latents scored at most 0.29 where the k-th
    score was 0.93). At the living scale the new latent wins a slot on the token it was drawn toward (its
    direction is that token's, so its pre-activation is the token's whole norm) and on tokens like it."""
    dead_idx = dead.nonzero().squeeze(-1)
    n = min(len(dead_idx), x.shape[0])
    if n == 0:
        return dead_idx[:0]
    idx = dead_idx[:n]
    B, S, D = x.shape
    W_dec = cc.W_dec
    loss = (cc(x).recon.float() - x.float()).pow(2).sum(dim=(1, 2))  # [B] squared error of each token
    weights = loss.double().pow(2) + 1e-30  # every token drawable, so n <= B draws without replacement exist
    tokens = torch.multinomial(weights, n, replacement=False, generator=generator)
    v = (x[tokens] - cc.b_dec).reshape(n, -1).to(W_dec.dtype)  # [n, S*D] centred inputs
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(v, src=0)
    alive = ~dead if (~dead).any() else torch.ones_like(dead)
    enc_norm = cc.W_enc.reshape(-1, cc.d_sae).norm(dim=0)[alive].mean()
    if match_living:
        dec_norm = W_dec[alive].reshape(int(alive.sum()), -1).norm(dim=-1).mean()
    else:  # Bricken et al.: each snapshot's decoder norm ~ dec_init_norm as at init, the encoder at 0.2x the living
        dec_norm, enc_norm = dec_init_norm * S ** 0.5, 0.2 * enc_norm
    W_dec[idx] = (v * dec_norm).view(n, S, D)
    cc.W_enc[:, :, idx] = (v * enc_norm).T.reshape(S, D, n).to(cc.W_enc.dtype)
    cc.b_enc[idx] = 0.0
    if init_threshold is not None and hasattr(cc, "log_threshold"):
        cc.log_threshold[idx] = float(torch.tensor(init_threshold).log())
    if optimizer is not None:
        _reset_adam_rows(optimizer, cc, idx)
    return idx
