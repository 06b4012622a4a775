"""The feature browser's data (browser.json): for chosen features, their top activating contexts.

Features: half the budget goes to the largest decoder-norm change (max_s n_s - min_s n_s), the rest to
seeded random picks spread over the live categories. Views per feature:
    latent       tokens ranked by the shared code f_i (what the crosscoder as a whole reads)
    <snapshot>   tokens ranked by that snapshot's own encoder term a_s . W_enc[s, :, i], i.e. what the
                 checkpoint at that step alone says about the feature (differs between snapshots)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from analysis.activations import LATENT_VIEW, PassStats


def choose_features(table: pd.DataFrame, n: int, seed: int = 0) -> list[tuple[int, str]]:
    """(feature, why chosen) for up to n live features."""
    live = table[table.category != "dead"]
    chosen: dict[int, str] = {}
    for f in live.nlargest((n + 1) // 2, "norm_change").feature:
        chosen[int(f)] = "largest norm change"
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(g.feature.to_numpy())) for c, g in live.groupby("category", sort=True)}
    while len(chosen) < min(n, len(live)) and any(pools.values()):
        for cat, pool in pools.items():
            while pool and int(pool[0]) in chosen:
                pool.pop(0)
            if pool and len(chosen) < n:
                chosen[int(pool.pop(0))] = f"random {cat}"
    return list(chosen.items())


def browser_entries(table: pd.DataFrame, stats: PassStats, names: list[str], steps: list[int], n_features: int,
                    decode: Callable[[int], str] | None, before: int = 12, after: int = 4,
                    seed: int = 0) -> list[dict]:
    """JSON-ready records: feature facts, its norm curve and per-view contexts with the token highlighted."""
    T = stats.token_ids.shape[1]
    flat = stats.token_ids.reshape(-1)
    cache: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in cache:
            cache[token] = decode(token) if decode is not None else f"⟨{token}⟩"
        return cache[token]

    out = []
    for feature, why in choose_features(table, n_features, seed):
        row = table.loc[feature]
        views = []
        for view, top in stats.top.items():
            contexts = []
            for value, g in zip(top.values[:, feature].tolist(), top.index[:, feature].tolist()):
                if view == LATENT_VIEW and value <= 0:
                    continue  # the shared code never went this high: fewer firing tokens than contexts
                window, pos = divmod(int(g), T)
                lo, hi = max(0, pos - before), min(T, pos + after + 1)
                contexts.append({"tokens": [text(int(t)) for t in flat[window * T + lo: window * T + hi]],
                                 "highlight": pos - lo, "value": float(value), "window": window, "position": pos})
            if view == LATENT_VIEW:
                label = "shared code f_i (all snapshots together)"
            else:
                s = names.index(view)
                label = f"{view} (step {steps[s]}, decoder norm {row[f'norm_{view}']:.3g}): its own encoder term"
            views.append({"view": view, "label": label, "contexts": contexts})
        out.append({
            "feature": feature, "why": why, "category": row.category,
            "emergence_step": _int(row.emergence_step), "peak_step": _int(row.peak_step),
            "lifetime": _int(row.lifetime), "freq": float(row.freq),
            "norms": [float(row[f"norm_{n}"]) for n in names], "views": views,
        })
    return out


def _int(value) -> int | None:
    return None if pd.isna(value) else int(value)
