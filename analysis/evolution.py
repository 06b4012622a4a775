"""The per-feature evolution table (features.parquet / features.csv) and the decoder projection matrix.

Axes: F latents, S snapshots, D model width. The column definitions are in docs/ANALYSIS.md; in short,
with n_s = ||W_dec[i, s]|| and "present at s" meaning n_s >= emergence_fraction * max_s n_s:
emergence = first present snapshot, end = last present snapshot, lifetime = end - emergence + 1
(snapshots), persistence = share of snapshots from emergence on where the feature is present.

Categories (dead first, then by presence at the first and last snapshot):
    dead        never fired on the analysed tokens (or, with no activation pass, a zero decoder)
    persistent  present at the first and at the last snapshot
    initial     present at the first snapshot (from initialisation), gone by the last
    emergent    born after the first snapshot, still present at the last
    transient   born after the first snapshot, gone by the last
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data.format import atomic_path

CATEGORIES = ("dead", "persistent", "initial", "emergent", "transient")


def presence(norms: np.ndarray, emergence_fraction: float) -> np.ndarray:
    """norms [F, S] -> [F, S] bool: n_s >= fraction * max_s n_s (never for an all-zero decoder)."""
    peak = norms.max(axis=1, keepdims=True)
    return (norms >= emergence_fraction * peak) & (peak > 0)


def emergence_index(norms: np.ndarray, emergence_fraction: float) -> np.ndarray:
    """norms [F, S] -> [F] the table's emergence column: first snapshot where the feature is present (see
    ``presence``), -1 when it never is. data.synthetic's recovery check imports this one definition."""
    present = presence(norms, emergence_fraction)
    return np.where(present.any(1), present.argmax(1), -1)


def end_index(norms: np.ndarray, emergence_fraction: float) -> np.ndarray:
    """norms [F, S] -> [F] the table's end column: last snapshot where the feature is present, -1 when it never is."""
    present = presence(norms, emergence_fraction)
    return np.where(present.any(1), norms.shape[1] - 1 - present[:, ::-1].argmax(1), -1)


def categorise(present: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """present [F, S], dead [F] -> [F] category names (see the module docstring)."""
    first, last = present[:, 0], present[:, -1]
    out = np.where(first, np.where(last, "persistent", "initial"), np.where(last, "emergent", "transient"))
    return np.where(dead | ~present.any(1), "dead", out).astype(object)


CHUNK = 1024  # latents per float64 block: a paper-size W_dec (98k x 32 x 768) is ~10 GB in float32 alone


def _per_chunk(W_dec: torch.Tensor, fn) -> np.ndarray:
    """fn over float64 blocks of CHUNK latents of W_dec [F, S, D], concatenated: never a full float64 copy."""
    return np.concatenate([fn(W_dec[lo:lo + CHUNK].detach().cpu().double()).numpy()
                           for lo in range(0, W_dec.shape[0], CHUNK)])


def decoder_norms(W_dec: torch.Tensor) -> np.ndarray:
    """[F, S] ||W_dec[i, s]|| in float64."""
    return _per_chunk(W_dec, lambda w: w.norm(dim=-1))


def consecutive_cosines(W_dec: torch.Tensor) -> np.ndarray:
    """W_dec [F, S, D] -> [F, S-1]: cos(W_dec[i, s-1], W_dec[i, s]); NaN where either vector is zero."""
    def block(w: torch.Tensor) -> torch.Tensor:
        a, b = w[:, :-1], w[:, 1:]
        denom = a.norm(dim=-1) * b.norm(dim=-1)
        cos = (a * b).sum(-1) / denom
        return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))
    return _per_chunk(W_dec, block)


def feature_table(W_dec: torch.Tensor, names: list[str], steps: list[int], emergence_fraction: float = 0.2,
                  fired: np.ndarray | None = None, active: np.ndarray | None = None) -> pd.DataFrame:
    """One row per latent. W_dec [F, S, D] (normalised units); fired [F] and active [F, S] are the
    activation frequencies from analysis.activations (None without an activation pass: NaN columns,
    and only all-zero decoders count as dead)."""
    norms = decoder_norms(W_dec)  # [F, S]
    F, S = norms.shape
    if len(names) != S or len(steps) != S:
        raise ValueError(f"feature_table: {len(names)} names / {len(steps)} steps for {S} snapshots")
    present = presence(norms, emergence_fraction)
    any_present = present.any(1)
    emergence = emergence_index(norms, emergence_fraction)
    end = end_index(norms, emergence_fraction)
    after = np.arange(S)[None, :] >= emergence[:, None]
    persistence = np.where(any_present, (present & after).sum(1) / np.maximum(S - emergence, 1), np.nan)
    peak = norms.argmax(1)
    step_of = np.asarray(steps)
    dead = (fired <= 0) if fired is not None else (norms.max(1) <= 0)

    def idx_col(values: np.ndarray) -> pd.Series:
        return pd.Series(np.where(values >= 0, values, 0), dtype="Int64").mask(values < 0)

    def step_col(values: np.ndarray) -> pd.Series:
        return pd.Series(step_of[np.maximum(values, 0)], dtype="Int64").mask(values < 0)

    cols: dict[str, object] = {
        "feature": np.arange(F),
        "category": categorise(present, dead),
        "max_norm": norms.max(1),
        "norm_change": norms.max(1) - norms.min(1),
        "peak_index": peak,
        "peak_step": step_of[peak],
        "emergence_index": idx_col(emergence),
        "emergence_step": step_col(emergence),
        "end_index": idx_col(end),
        "end_step": step_col(end),
        "lifetime": pd.Series(end - emergence + 1, dtype="Int64").mask(~any_present),
        "persistence": persistence,
        "freq": fired if fired is not None else np.full(F, np.nan),
    }
    for s, name in enumerate(names):
        cols[f"norm_{name}"] = norms[:, s]
    for s, name in enumerate(names):
        cols[f"freq_{name}"] = active[:, s] if active is not None else np.full(F, np.nan)
    cosines = consecutive_cosines(W_dec)
    for s, name in enumerate(names[1:], start=1):
        cols[f"cos_prev_{name}"] = cosines[:, s - 1]
    return pd.DataFrame(cols)


def norm_matrix(table: pd.DataFrame, names: list[str]) -> np.ndarray:
    """[F, S] decoder norms back from the table's norm_<snapshot> columns."""
    return table[[f"norm_{n}" for n in names]].to_numpy(dtype=np.float64)


@torch.no_grad()
def projection_matrix(W_dec: torch.Tensor, present: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean over features present at both i and j of cos(W_dec[f, i], W_dec[f, j]).

    W_dec [F, S, D], present [F, S] bool. Returns (mean [S, S] with NaN where no feature is present at
    both, count [S, S] features averaged). Chunked over F: the per-feature Gram matrices are [F, S, S].
    """
    F, S, _ = W_dec.shape
    total = torch.zeros(S, S, dtype=torch.float64)
    count = torch.zeros(S, S, dtype=torch.float64)
    mask_all = torch.from_numpy(present)
    for lo in range(0, F, chunk):
        w = W_dec[lo:lo + chunk].detach().cpu().double()
        u = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        gram = u @ u.transpose(1, 2)  # [f, S, S]
        m = mask_all[lo:lo + chunk].double()
        both = m[:, :, None] * m[:, None, :]
        total += (gram * both).sum(0)
        count += both.sum(0)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return mean.numpy(), count.numpy()


def live_projection(W_dec: torch.Tensor, table: pd.DataFrame, names: list[str],
                    emergence_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """projection_matrix over the live features, each counted at the snapshots where it is present (figure 3)."""
    present = presence(norm_matrix(table, names), emergence_fraction)
    return projection_matrix(W_dec, present & (table.category != "dead").to_numpy()[:, None])


def save_table(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """features.parquet and features.csv, each written to a temp name and renamed."""
    paths = []
    for name, write in (("features.parquet", lambda p: table.to_parquet(p, index=False)),
                        ("features.csv", lambda p: table.to_csv(p, index=False))):
        path = Path(out_dir) / name
        with atomic_path(path) as tmp:
            write(tmp)
        paths.append(path)
    return paths
