"""The run figures, drawn only from summary.json and the feature table (so they can be redrawn elsewhere).

Steps are drawn on a log axis x = log10(1 + step), which keeps step 0 (initialisation) on the plot;
ticks are labelled with the step itself. Figure numbers follow issue 4 (5 is the sweep's: analysis.sweep).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.evolution import CATEGORIES, norm_matrix  # noqa: E402
from data.format import atomic_path  # noqa: E402

CATEGORY_COLORS = {"dead": "#bbbbbb", "persistent": "#4c72b0", "initial": "#8172b2", "emergent": "#55a868",
                   "transient": "#dd8452"}
MAX_HEATMAP_ROWS = 2000  # rows drawn in the heat-map; more features are subsampled evenly in sorted order


def log_x(steps) -> np.ndarray:
    return np.log10(1.0 + np.asarray(steps, dtype=np.float64))


def step_label(step: float) -> str:
    step = int(round(step))
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if step >= div and step % div == 0:
            return f"{step // div}{suffix}"
    return str(step)


def set_step_axis(ax, steps, extent=None, label: str = "training step (log scale)") -> None:
    """x axis in log10(1 + step): labelled ticks at 0, 1, 10, 100, ... up to max(extent or steps), and a
    small unlabelled tick at each snapshot's step so cells and points can be matched to snapshots."""
    hi = max(list(extent if extent is not None else steps) or [1])
    first = 0 if hi < 1000 else 1  # over many decades a "1" label would crowd the "0" beside it
    ticks = [0] + [10 ** k for k in range(first, int(np.log10(max(hi, 1))) + 2) if 10 ** k <= hi * 1.5]
    ax.set_xticks(log_x(ticks), [step_label(t) for t in ticks])
    ax.set_xticks(log_x(steps), minor=True)
    ax.tick_params(axis="x", which="minor", direction="in", length=7, width=1.5, color="#c44e52")
    ax.set_xlabel(label + "; red ticks: snapshots")


def cell_edges(steps) -> np.ndarray:
    """[S + 1] edges (in log_x units) of one cell per snapshot, meeting halfway between snapshots."""
    x = log_x(steps)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _names_steps(summary: dict) -> tuple[list[str], list[int]]:
    return [s["name"] for s in summary["snapshots"]], [s["step"] for s in summary["snapshots"]]


def fig_norm_heatmap(table: pd.DataFrame, summary: dict):
    """1. Decoder norm of every live feature at every snapshot (relative to its maximum), sorted by emergence."""
    names, steps = _names_steps(summary)
    live = table[table.category != "dead"].sort_values(["emergence_index", "peak_index", "max_norm"],
                                                      ascending=[True, True, False])
    fig, ax = plt.subplots(figsize=(8, 6), layout="constrained")
    if live.empty:
        ax.text(0.5, 0.5, "no live features", ha="center", va="center", transform=ax.transAxes)
    else:
        rel = norm_matrix(live, names) / live.max_norm.to_numpy()[:, None]
        rows = np.linspace(0, len(rel) - 1, min(len(rel), MAX_HEATMAP_ROWS)).round().astype(int)
        mesh = ax.pcolormesh(cell_edges(steps), np.arange(len(rows) + 1), rel[rows], cmap="magma", vmin=0, vmax=1,
                             shading="flat", rasterized=True)
        fig.colorbar(mesh, ax=ax, label="decoder norm / feature's maximum")
        ax.set_ylim(len(rows), 0)
        ax.set_ylabel(f"feature, sorted by emergence ({len(live)} live"
                      + (f", {len(rows)} drawn)" if len(rows) < len(live) else ")"))
    set_step_axis(ax, steps)
    ax.set_title(f"Decoder-norm evolution (emergence at {summary['emergence_fraction']:g} of max)")
    return fig


def _bars_per_snapshot(ax, steps, counts, **kw) -> None:
    edges = cell_edges(steps)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="white", linewidth=0.5, **kw)


def fig_emergence_lifetime(table: pd.DataFrame, summary: dict):
    """2. (a) features emerging / peaking at each snapshot; (b) lifetimes in snapshots, by category."""
    names, steps = _names_steps(summary)
    S = len(steps)
    live = table[table.category != "dead"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    emerge = np.bincount(live.emergence_index.to_numpy(dtype=int), minlength=S)
    peak = np.bincount(live.peak_index.to_numpy(dtype=int), minlength=S)
    _bars_per_snapshot(a, steps, emerge, color="#55a868", label="emergence snapshot")
    a.step(cell_edges(steps), np.append(peak, peak[-1]), where="post", color="#c44e52", lw=1.5, label="peak snapshot")
    if summary.get("median_emergence_step") is not None:
        a.axvline(log_x(summary["median_emergence_step"]), color="k", ls="--", lw=1,
                  label=f"median emergence (born later): {step_label(summary['median_emergence_step'])}")
    set_step_axis(a, steps)
    a.set_ylabel("features")
    a.set_title("(a) When features emerge and peak")
    a.legend(fontsize=8)
    bottom = np.zeros(S)
    lifetimes = np.arange(1, S + 1)
    for cat in CATEGORIES[1:]:
        sub = live[live.category == cat]
        counts = np.bincount(sub.lifetime.to_numpy(dtype=int), minlength=S + 1)[1:S + 1]
        b.bar(lifetimes, counts, bottom=bottom, color=CATEGORY_COLORS[cat], label=f"{cat} ({len(sub)})", width=0.85)
        bottom += counts
    b.set_xlabel("lifetime (snapshots from emergence to last presence)")
    b.set_ylabel("features")
    b.set_xticks(lifetimes if S <= 16 else np.linspace(1, S, 8).round().astype(int))
    b.set_title("(b) Lifetimes, by category")
    b.legend(fontsize=8)
    return fig


def fig_projection(summary: dict):
    """3. Mean cosine between each feature's decoder at snapshot i and at snapshot j."""
    names, steps = _names_steps(summary)
    mean = np.array(summary["projection"]["mean"], dtype=np.float64)
    S = len(steps)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    im = ax.imshow(mean, cmap="viridis", vmin=min(0.0, np.nanmin(mean)) if np.isfinite(mean).any() else 0, vmax=1,
                   origin="lower")
    fig.colorbar(im, ax=ax, label="mean cos(W_dec[f, i], W_dec[f, j])")
    tick = np.unique(np.linspace(0, S - 1, min(S, 12)).round().astype(int))
    labels = [step_label(steps[t]) for t in tick]
    ax.set_xticks(tick, labels, rotation=45)
    ax.set_yticks(tick, labels)
    ax.set_xlabel("snapshot j (step)")
    ax.set_ylabel("snapshot i (step)")
    if S <= 10:
        for i in range(S):
            for j in range(S):
                if np.isfinite(mean[i, j]):
                    ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if mean[i, j] < 0.6 else "k")
    ax.set_title("Decoder direction projection\n(features present at both snapshots)")
    return fig


def fig_ev_l0(summary: dict):
    """4. (a) explained variance and (b) L0 per snapshot, with single-snapshot SAEs where present."""
    names, steps = _names_steps(summary)
    x = log_x(steps)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    ev, l0 = summary["explained_variance"], summary["l0"]
    for ax, block, ylabel in ((a, ev, "explained variance"), (b, l0, "L0 (latents active at the snapshot)")):
        per = block.get("per_snapshot")
        if per:
            ax.plot(x, [per[n] if per[n] is not None else np.nan for n in names], "o-", color="#4c72b0",
                    label=f"crosscoder ({block['source']})")
        if block.get("overall") is not None:
            what = "all snapshots" if ax is a else "shared code f > 0"
            ax.axhline(block["overall"], color="#4c72b0", ls="--", lw=1, label=f"{what}: {block['overall']:.3g}")
        base = [r for r in summary.get("baselines", []) if r.get("step") is not None]
        key = "explained_variance" if ax is a else "l0"
        pts = [(r["step"], r[key]) for r in base if r.get(key) is not None]
        if pts:
            ax.plot(log_x([p[0] for p in pts]), [p[1] for p in pts], "^", color="#c44e52", ms=8,
                    label="single-snapshot SAE")
        set_step_axis(ax, steps)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured (no dataset, no metrics.json)", ha="center", transform=ax.transAxes)
    a.set_title("(a) Explained variance per snapshot")
    b.set_title("(b) L0 per snapshot")
    return fig


def fig_turning_point(summary: dict):
    """6. Share of live features emerged by each step, the step where half have, and the model's loss curve."""
    names, steps = _names_steps(summary)
    curve = summary.get("loss_curve")
    fig, axes = plt.subplots(2 if curve else 1, 1, figsize=(8, 7 if curve else 4.5), sharex=True,
                             layout="constrained", squeeze=False)
    ax = axes[0, 0]
    fraction = np.array(summary["emerged_fraction"], dtype=np.float64)
    ax.step(log_x(steps), fraction, where="post", color="#55a868", lw=2, marker="o", ms=4,
            label="features emerged")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    tp = summary.get("turning_point_step")
    for row in axes[:, 0]:
        if tp is not None:
            row.axvline(log_x(tp), color="#c44e52", ls="--", lw=1.5, label=f"half emerged: step {step_label(tp)}")
        row.grid(alpha=0.3)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of live features emerged")
    ax.set_title("Turning point: when features emerge")
    ax.legend(fontsize=8, loc="lower right")
    if curve:
        low = axes[1, 0]
        low.plot(log_x(curve["steps"]), curve["loss"], color="#4c72b0", lw=1.5, label="model training loss")
        low.set_ylabel("language-model loss")
        low.legend(fontsize=8)
        set_step_axis(low, steps, extent=list(steps) + list(curve["steps"]))
    else:
        set_step_axis(ax, steps)
    return fig


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


CAPTIONS = {  # the report's caption of each run figure, by file stem
    "fig1_decoder_norms": "1. Decoder norm of every live feature at each snapshot, relative to its maximum, "
                          "features sorted by emergence (paper Fig. 4).",
    "fig2_emergence_lifetime": "2. (a) How many features emerge and peak at each snapshot; (b) lifetimes in "
                               "snapshots, by category (paper Fig. 5a, 5b).",
    "fig3_projection": "3. Mean cosine between a feature's decoder at snapshot i and at snapshot j, over "
                       "features present at both (paper Fig. 5c).",
    "fig4_ev_l0": "4. Explained variance and L0 per snapshot, with single-snapshot SAEs where known "
                  "(paper Fig. 3a, 3b).",
    "fig6_turning_point": "6. Share of live features emerged by each step; the dashed line marks the step "
                          "where half have, beside the model's own loss curve when the suite saved one.",
}


def run_figures(table: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    """Write the five run figures (1-4 and 6) as PNG into out_dir; returns their paths."""
    figures = {
        "fig1_decoder_norms.png": lambda: fig_norm_heatmap(table, summary),
        "fig2_emergence_lifetime.png": lambda: fig_emergence_lifetime(table, summary),
        "fig3_projection.png": lambda: fig_projection(summary),
        "fig4_ev_l0.png": lambda: fig_ev_l0(summary),
        "fig6_turning_point.png": lambda: fig_turning_point(summary),
    }
    return [save_figure(make(), out_dir / name) for name, make in figures.items()]


def log_to_tensorboard(paths: list[Path], log_dir: Path, step: int = 0) -> None:
    """Each PNG as a TensorBoard image (tag = file stem)."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(log_dir))
    try:
        for path in paths:
            image = plt.imread(path)[..., :3]  # [H, W, 3] float in [0, 1]
            writer.add_image(f"analysis/{path.stem}", image, step, dataformats="HWC")
    finally:
        writer.close()
