"""Figure 7: a task's metric over snapshots beside the features that carry it (drawn from attribution.json,
the per-feature attribution matrix and the feature table, so it can be redrawn elsewhere)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.attribution_summary import at_k
from analysis.figures import cell_edges, log_x, plt, set_step_axis, step_label

MAX_CARRIERS = 24  # feature rows drawn


def reported_columns(summary: dict) -> np.ndarray:
    """[S] bool: snapshots whose selection-half gap (clean - baseline, over which attribution shares are taken)
    is at least min_gap. Elsewhere a share is a ratio of noise and is drawn grey, not as a number."""
    return np.array([s["selection"]["learned"] for s in summary["snapshots"]], dtype=bool)


def carriers(summary: dict, ig: np.ndarray, per_snapshot: int = 4) -> list[int]:
    """Features drawn: the top ``per_snapshot`` by attribution at every snapshot whose selection gap reaches
    min_gap (else at every snapshot with a positive gap, else the last), strongest first, at most MAX_CARRIERS."""
    gaps = np.array([s["selection"]["gap"] for s in summary["snapshots"]])
    snaps = list(np.flatnonzero(reported_columns(summary))) or list(np.flatnonzero(gaps > 0)) \
        or [len(summary["snapshots"]) - 1]
    chosen: dict[int, float] = {}
    for i in snaps:
        for f in np.argsort(-ig[i], kind="stable")[:per_snapshot]:
            if ig[i, f] > 0:
                chosen[int(f)] = max(chosen.get(int(f), -np.inf), float(ig[i, f]))
    return sorted(chosen, key=lambda f: -chosen[f])[:MAX_CARRIERS]


def _grey_columns(ax, edges: np.ndarray, keep: np.ndarray) -> None:
    """Shade the snapshots' cells where ``keep`` is False."""
    for j in np.flatnonzero(~keep):
        ax.axvspan(edges[j], edges[j + 1], color="#d9d9d9", alpha=0.6, lw=0, zorder=0)


def _values(snaps: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if s[key] is None else s[key] for s in snaps], dtype=np.float64)


def fig_attribution(summary: dict, ig: np.ndarray, table: pd.DataFrame | None):
    """(a) the task's effect over snapshots on the test prompts (metric minus the corrupted baseline, so a
    model's preferences that do not depend on the task cancel), with the top-k broken, matched random k broken
    and the top-k restored; (b) the share of the effect carried by all features and by the error term
    (selection prompts); (c) each carrier feature's share of the gap; (d) the same features' decoder norm
    relative to their maximum, with their emergence marked. Shares are drawn only where their gap reaches
    min_gap (grey elsewhere)."""
    snaps = summary["snapshots"]
    names, steps = [s["name"] for s in snaps], [s["step"] for s in snaps]
    k, min_gap = summary["show_k"], summary["min_gap"]
    x = log_x(steps)
    edges = cell_edges(steps)
    rows = carriers(summary, ig)
    split = summary.get("split", {})
    fig, axes = plt.subplots(4, 1, figsize=(9, 13.5), sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [1.1, 0.7, 1, 1]})
    ax = axes[0]
    learned = np.array([s["learned"] for s in snaps], dtype=bool)
    _grey_columns(ax, edges, learned)
    base = np.array([s["metric_baseline"] for s in snaps])
    ax.plot(x, [s["metric_clean"] for s in snaps] - base, "o-", color="#4c72b0", lw=2,
            label="clean prompts")
    top, rand_m, rand_s, restore = (np.array([at_k(s, key, k, np.nan) for s in snaps], dtype=np.float64)
                                    for key in ("break_top", "break_random_mean", "break_random_std", "restore_top"))
    ax.plot(x, top - base, "v-", color="#dd8452", lw=1.5, label=f"top {k} features broken")
    ax.plot(x, rand_m - base, "^-", color="#55a868", lw=1.5,
            label=f"{k} random features matched in |Δf| broken (mean ± sd of {summary['random_sets']})")
    ax.fill_between(x, rand_m - rand_s - base, rand_m + rand_s - base, color="#55a868", alpha=0.2)
    ax.plot(x, restore - base, "d:", color="#8172b2", lw=1.5,
            label=f"corrupted, top {k} restored")
    ax.axhline(0, color="#c44e52", ls="--", lw=1.2, label="corrupted baseline")
    ax.axhline(min_gap, color="0.4", ls=":", lw=1, label=f"min_gap {min_gap:g} (grey: clean below it)")
    first = [s["step"] for s in snaps if s["learned"]]
    if first:
        ax.axvline(log_x(first[0]), color="gray", ls=":", lw=1)
        ax.text(log_x(first[0]), ax.get_ylim()[1], f" learned from step {step_label(first[0])}",
                va="top", fontsize=8, color="0.3")
    ax.set_ylabel("logit difference − corrupted baseline")
    test = f" ({split['test']} test prompts; features chosen on {split['selection']} others)" if split else ""
    ax.set_title(f"{summary['task']}: task effect and the features that carry it{test}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[1]
    keep = reported_columns(summary)
    _grey_columns(ax, edges, keep)
    feat, err = _values(snaps, "feature_share"), _values(snaps, "error_share")
    ax.plot(x, feat, "o-", color="#4c72b0", lw=1.5, label="all features (Σ IG / gap)")
    ax.plot(x, err, "s-", color="#c44e52", lw=1.5, label="error term (IG / gap)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axhline(1, color="0.5", lw=0.8, ls=":")
    if not keep.any():
        ax.text(0.5, 0.5, f"no snapshot with an effect >= min_gap ({min_gap:g}): no shares reported",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.3")
    ax.set_ylabel("share of the effect")
    ax.set_title("share of the effect: all features vs the error term (selection prompts; grey: not reported)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)

    gaps = np.array([s["selection"]["gap"] for s in snaps])
    share = ig[:, rows].T / np.where(keep, gaps, np.nan)[None, :]  # [rows, S]
    lim = max(np.nanmax(np.abs(share)) if rows and np.isfinite(share).any() else 1.0, 1e-3)
    ax = axes[2]
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")  # grey: not reported
    mesh = ax.pcolormesh(edges, np.arange(len(rows) + 1), np.ma.masked_invalid(share) if rows
                         else np.zeros((0, len(steps))), cmap=cmap, vmin=-lim, vmax=lim, shading="flat")
    fig.colorbar(mesh, ax=ax, label="attribution / (clean - baseline)")
    labels = [f"#{f}" for f in rows]
    ax.set_yticks(np.arange(len(rows)) + 0.5, labels, fontsize=7)
    ax.set_ylim(len(rows), 0)
    ax.set_ylabel("feature (strongest carriers first)")
    ax.set_title("each feature's share of the effect (integrated gradients, selection prompts; grey: not reported)",
                 fontsize=10)

    ax = axes[3]
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
