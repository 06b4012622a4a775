"""One pass of the crosscoder over cached tokens: firing, per-snapshot EV and L0, top contexts.

Axes: B tokens in a batch, S snapshots, D model width, F latents, T tokens per window, K contexts kept.

The shared code f [B, F] is the same for every snapshot, so "active at snapshot s" needs the decoder:
latent i is active at s on a token when its contribution to that snapshot's reconstruction,
f_i ||W_dec[i, s]||, exceeds ``active_threshold * sqrt(D)`` (a fraction of a typical normalised
activation's norm, which is sqrt(D) under the default normalisation). The per-snapshot L0 is the mean
number of latents active at s per token, computed with crosscoder.metrics.l0 on the masked code.

Explained variance and L0 are measured on held-out windows only (the last ``val_shards`` shards, as in
training); firing frequencies and top contexts use every window read. Held-out windows are read first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from crosscoder.metrics import ExplainedVariance, l0
from crosscoder.model import Crosscoder
from data.format import Manifest, ShardEntry, from_storage, iter_samples

LATENT_VIEW = "latent"  # the top-context view ranked by the shared code f_i


class TopContexts(NamedTuple):
    values: torch.Tensor  # [K, F] the largest values per latent, descending
    index: torch.Tensor  # [K, F] their global token index (window * T + position)


class PassStats(NamedTuple):
    tokens: int  # tokens read
    eval_tokens: int  # tokens the explained variance and L0 were measured on
    eval_held_out: bool  # True when those were held-out tokens (False: the dataset has no held-out shard)
    fired: np.ndarray  # [F] fraction of tokens with f_i > 0
    active: np.ndarray  # [F, S] fraction of tokens with f_i ||W_dec[i, s]|| > active_threshold * sqrt(D)
    explained_variance: np.ndarray  # [S] crosscoder.metrics.ExplainedVariance on the eval tokens
    explained_variance_overall: float
    l0: float  # crosscoder.metrics.l0 of the shared code
    l0_per_snapshot: np.ndarray  # [S] l0 of the code masked to latents active at s
    top: dict[str, TopContexts]  # LATENT_VIEW, and one per view snapshot name (its own encoder term)
    token_ids: np.ndarray  # [N, T] token ids of the windows read, in reading order


def analysis_shards(manifest: Manifest, val_shards: int) -> tuple[list[ShardEntry], int]:
    """Held-out shards (the last ``val_shards``) first, then the training shards; and how many are held out."""
    n_val = min(max(val_shards, 0), len(manifest.shards) - 1) if len(manifest.shards) > 1 else 0
    cut = len(manifest.shards) - n_val
    return manifest.shards[cut:] + manifest.shards[:cut], n_val


def iter_windows(data_path: Path, manifest: Manifest, shards: list[ShardEntry], n_held: int, snapshot_idx: list[int],
                 batch_windows: int, max_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (acts [n, T, S, D] float32 raw, tokens [n, T], held_out [n] bool), up to max_tokens."""
    T = manifest.tokens_per_sample
    held_files = {e.file for e in shards[:n_held]}
    acts, tokens, held, seen = [], [], [], 0
    for e in shards:
        for a, t, _ in iter_samples(data_path, manifest, shards=[e]):
            if seen + T > max_tokens:
                break
            acts.append(from_storage(a, manifest.dtype)[:, snapshot_idx])
            tokens.append(t)
            held.append(e.file in held_files)
            seen += T
            if len(acts) == batch_windows:
                yield np.stack(acts), np.stack(tokens), np.array(held)
                acts, tokens, held = [], [], []
        if seen + T > max_tokens:
            break
    if acts:
        yield np.stack(acts), np.stack(tokens), np.array(held)


def merge_top(top: TopContexts | None, values: torch.Tensor, offset: int, k: int) -> TopContexts:
    """Keep the k largest values per latent over everything seen; values: [B, F] for tokens offset.. offset+B."""
    v, i = values.topk(min(k, values.shape[0]), dim=0)
    i = i + offset
    if top is not None:
        v, i = torch.cat([top.values, v]), torch.cat([top.index, i])
        v, sel = v.topk(min(k, v.shape[0]), dim=0)
        i = i.gather(0, sel)
    return TopContexts(v, i)


def active_thresholds(crosscoder: Crosscoder, active_threshold: float) -> torch.Tensor:
    """[S, F]: f_i above which latent i counts as active at snapshot s (inf where its decoder is zero)."""
    norms = crosscoder.decoder_norms().detach().T  # [S, F]
    tau = active_threshold * math.sqrt(crosscoder.d_model)
    return torch.where(norms > 0, tau / norms.clamp(min=1e-30), torch.full_like(norms, math.inf))


def browser_views(n_snapshots: int, n_views: int) -> list[int]:
    """Indices of ``n_views`` evenly spaced snapshots (first and last included) whose own encoder term the feature
    browser ranks contexts by."""
    return sorted(set(np.linspace(0, n_snapshots - 1, max(n_views, 0)).round().astype(int).tolist()))


@torch.no_grad()
def activation_pass(crosscoder: Crosscoder, data_path: Path, manifest: Manifest, val_shards: int, max_tokens: int | None,
                    batch_size: int, active_threshold: float, view_snapshots: list[int], n_contexts: int,
                    device: str = "cpu") -> PassStats:
    """Run ``crosscoder`` over up to ``max_tokens`` cached tokens (None: all); definitions in the module docstring."""
    max_tokens = max_tokens if max_tokens is not None else manifest.n_tokens
    crosscoder = crosscoder.to(device).eval()
    S, D, F = crosscoder.n_snapshots, crosscoder.d_model, crosscoder.d_sae
    T = manifest.tokens_per_sample
    snapshot_idx = manifest.snapshot_indices(crosscoder.snapshot_names)
    shards, n_held = analysis_shards(manifest, val_shards)
    scale = crosscoder.scale.to(device)[None, :, None]
    thresholds = active_thresholds(crosscoder, active_threshold)
    ev = ExplainedVariance(S, D).to(device)
    fired = torch.zeros(F, dtype=torch.float64, device=device)
    active = torch.zeros(S, F, dtype=torch.float64, device=device)
    l0_sum, l0_s_sum, eval_tokens = 0.0, torch.zeros(S, dtype=torch.float64), 0
    top: dict[str, TopContexts | None] = {LATENT_VIEW: None, **{crosscoder.snapshot_names[s]: None for s in view_snapshots}}
    token_ids, offset = [], 0
    total = min(max_tokens, sum(e.tokens for e in shards))
    batch_windows = max(1, batch_size // T)
    bar = tqdm(total=total, unit="tok", desc="activation pass", leave=False)
    for acts, tokens, held in iter_windows(data_path, manifest, shards, n_held, snapshot_idx, batch_windows, max_tokens):
        x = torch.from_numpy(acts).to(device).reshape(-1, S, D) * scale  # [B, S, D] normalised
        out = crosscoder(x)
        f = out.latents  # [B, F]
        fired += (f > 0).sum(0)
        for s in range(S):
            active[s] += (f > thresholds[s]).sum(0)
        rows = torch.from_numpy(np.repeat(held, T)).to(device) if n_held else torch.ones(len(f), dtype=torch.bool, device=device)
        if rows.any():
            ev.update(x[rows], out.recon[rows])
            n = int(rows.sum())
            l0_sum += float(l0(f[rows])) * n
            fs = f[rows]
            for s in range(S):
                l0_s_sum[s] += float(l0(fs * (fs > thresholds[s]))) * n
            eval_tokens += n
        top[LATENT_VIEW] = merge_top(top[LATENT_VIEW], f, offset, n_contexts)
        for s in view_snapshots:
            # Snapshot s's own share of the pre-activation: what that checkpoint's activation says about latent i.
            enc = x[:, s] @ crosscoder.W_enc[s]  # [B, F]
            top[crosscoder.snapshot_names[s]] = merge_top(top[crosscoder.snapshot_names[s]], enc, offset, n_contexts)
        token_ids.append(tokens)
        offset += len(f)
        bar.update(len(f))
    bar.close()
    if offset == 0:
        raise ValueError(f"{data_path}: max_tokens={max_tokens} is less than one window of {T} tokens")
    n_eval = max(eval_tokens, 1)
    return PassStats(
        tokens=offset, eval_tokens=eval_tokens, eval_held_out=n_held > 0,
        fired=(fired / offset).cpu().numpy(), active=(active.T / offset).cpu().numpy(),
        explained_variance=ev.compute().cpu().numpy(), explained_variance_overall=float(ev.overall()),
        l0=l0_sum / n_eval, l0_per_snapshot=(l0_s_sum / n_eval).numpy(),
        top={k: TopContexts(v.values.cpu(), v.index.cpu()) for k, v in top.items()},
        token_ids=np.concatenate(token_ids))
