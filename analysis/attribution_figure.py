"""Figure 7: a task's metric over snapshots beside the features that carry it (drawn from attribution.json,
the per-feature attribution matrix and the feature table, so it can be redrawn elsewhere)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.attribution import at_k
from analysis.figures import cell_edges, log_x, plt, set_step_axis, step_label

MAX_CARRIERS = 24  # feature rows drawn


def effect_columns(summary: dict) -> np.ndarray:
    """[S] bool: snapshots where the task has an effect to share out (clean above the baseline by at least a
    tenth of the largest such gap); elsewhere a feature's share of the gap is noise over a near-zero gap."""
    gaps = np.array([s["gap"] for s in summary["snapshots"]])
    return (gaps > 0) & (gaps >= 0.1 * max(gaps.max(), 0))


def carriers(summary: dict, ig: np.ndarray, per_snapshot: int = 4) -> list[int]:
    """Features drawn: the top ``per_snapshot`` by attribution at every snapshot where the task is learned
    (else where it has an effect, else the last), strongest first, at most MAX_CARRIERS."""
    learned = [i for i, s in enumerate(summary["snapshots"]) if s["learned"]]
    snaps = learned or list(np.flatnonzero(effect_columns(summary))) or [len(summary["snapshots"]) - 1]
    chosen: dict[int, float] = {}
    for i in snaps:
        for f in np.argsort(-ig[i], kind="stable")[:per_snapshot]:
            if ig[i, f] > 0:
                chosen[int(f)] = max(chosen.get(int(f), -np.inf), float(ig[i, f]))
    return sorted(chosen, key=lambda f: -chosen[f])[:MAX_CARRIERS]


def fig_attribution(summary: dict, ig: np.ndarray, table: pd.DataFrame | None):
    """(a) the task's effect over snapshots (metric minus the corrupted baseline, so a model's preferences that
    do not depend on the task cancel), with the top-k broken, random k broken and the top-k restored;
    (b) each carrier feature's share of the clean-baseline gap (integrated gradients) per snapshot;
    (c) the same features' decoder norm relative to their maximum, with their emergence marked."""
    snaps = summary["snapshots"]
    names, steps = [s["name"] for s in snaps], [s["step"] for s in snaps]
    k = summary["show_k"]
    x = log_x(steps)
    rows = carriers(summary, ig)
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [1.1, 1, 1]})
    ax = axes[0]
    base = np.array([s["metric_baseline"] for s in snaps])
    ax.plot(x, [s["metric_clean"] for s in snaps] - base, "o-", color="#4c72b0", lw=2,
            label="clean prompts")
    top, rand_m, rand_s, restore = (np.array([at_k(s, key, k, np.nan) for s in snaps]) for key in
                                    ("break_top", "break_random_mean", "break_random_std", "restore_top"))
    ax.plot(x, top - base, "v-", color="#dd8452", lw=1.5, label=f"top {k} features broken")
    ax.plot(x, rand_m - base, "^-", color="#55a868", lw=1.5, label=f"random {k} features broken (mean ± sd)")
    ax.fill_between(x, rand_m - rand_s - base, rand_m + rand_s - base, color="#55a868", alpha=0.2)
    ax.plot(x, restore - base, "d:", color="#8172b2", lw=1.5,
            label=f"corrupted, top {k} restored")
    ax.axhline(0, color="#c44e52", ls="--", lw=1.2, label="corrupted baseline")
    learned = [s["step"] for s in snaps if s["learned"]]
    if learned:
        ax.axvline(log_x(learned[0]), color="gray", ls=":", lw=1)
        ax.text(log_x(learned[0]), ax.get_ylim()[1], f" learned from step {step_label(learned[0])}",
                va="top", fontsize=8, color="0.3")
    ax.set_ylabel("logit difference − corrupted baseline")
    ax.set_title(f"{summary['task']}: task metric and the features that carry it")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    edges = cell_edges(steps)
    gaps = np.array([s["gap"] for s in snaps])
    share = ig[:, rows].T / np.where(effect_columns(summary), gaps, np.nan)[None, :]  # [rows, S]
    lim = max(np.nanmax(np.abs(share)) if rows and np.isfinite(share).any() else 1.0, 1e-3)
    ax = axes[1]
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("#e8e8e8")
    mesh = ax.pcolormesh(edges, np.arange(len(rows) + 1), np.ma.masked_invalid(share) if rows
                         else np.zeros((0, len(steps))), cmap=cmap, vmin=-lim, vmax=lim, shading="flat")
    fig.colorbar(mesh, ax=ax, label="attribution / (clean - baseline)")
    labels = [f"#{f}" for f in rows]
    ax.set_yticks(np.arange(len(rows)) + 0.5, labels, fontsize=7)
    ax.set_ylim(len(rows), 0)
    ax.set_ylabel("feature (strongest carriers first)")
    ax.set_title("share of the effect each feature carries (integrated gradients; blank: no effect to share)",
                 fontsize=10)

    ax = axes[2]
    if table is not None and rows:
        norms = table.loc[rows, [f"norm_{n}" for n in names]].to_numpy(dtype=np.float64)
        rel = norms / np.maximum(table.loc[rows, "max_norm"].to_numpy(dtype=np.float64), 1e-12)[:, None]
        mesh = ax.pcolormesh(edges, np.arange(len(rows) + 1), rel, cmap="magma", vmin=0, vmax=1, shading="flat")
        fig.colorbar(mesh, ax=ax, label="decoder norm / feature's maximum")
        for r, f in enumerate(rows):
            e = table.loc[f, "emergence_step"]
            if not pd.isna(e):
                ax.plot(log_x(int(e)), r + 0.5, marker="|", color="#55ff55", ms=9, mew=2)
    else:
        ax.text(0.5, 0.5, "no feature table", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(np.arange(len(rows)) + 0.5, labels, fontsize=7)
    ax.set_ylim(len(rows), 0)
    ax.set_ylabel("feature")
    ax.set_title("decoder norm of the same features (green tick: emergence)", fontsize=10)
    set_step_axis(ax, steps)
    return fig
