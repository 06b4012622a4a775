"""A sweep (Hydra multirun folder of run folders): explained variance against L0, the Pareto frontier, and
crosscoders against single-snapshot SAEs (runs trained with one snapshot, ``data.snapshots=[stepN]``).

Numbers come from each run's metrics.json (val/explained_variance[/<snapshot>], val/l0). L0 has one definition
for crosscoders and SAEs alike, L0_DEFINITION: the training's validation count of latents with f > 0 per token
(crosscoder.metrics.l0), whether or not a run was analysed since. (An analysed crosscoder's per-snapshot
"active at s" L0 in <run>/analysis/summary.json counts only latents whose contribution exceeds a threshold;
an SAE has no such number, so the comparison does not use it.)
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from analysis.figures import log_x, save_figure, set_step_axis  # noqa: E402
from analysis.run_files import select, snapshot_steps  # noqa: E402
from data.format import FormatError, atomic_path, read_manifest  # noqa: E402
from data.run_folder import SWEEP_COLUMNS, WEIGHTS_NAME, finished_runs, has_metrics, read_config, read_metrics  # noqa: E402

L0_DEFINITION = "L0 = latents with f > 0 per held-out token (training validation, val/l0), for crosscoders and SAEs alike"
CAPTIONS = {  # the report's caption of each sweep figure, by file stem
    "fig5_pareto": "5a. Explained variance against L0 for every run, with Pareto frontiers (paper Fig. 2). "
                   f"{L0_DEFINITION}.",
    "fig5_crosscoder_vs_sae": "5b. Crosscoders against single-snapshot SAEs trained on the same data "
                              f"(paper Fig. 3c). {L0_DEFINITION}.",
}


def run_folders(source: str | Path | list) -> list[Path]:
    """A sweep folder (every folder below it holding metrics.json: jobs, and the dictionaries of a job
    that trained several), a run folder, or a list of either."""
    if isinstance(source, (list, tuple)) or OmegaConf.is_list(source):
        return [p for s in source for p in run_folders(s)]
    path = Path(source)
    if has_metrics(path):
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such sweep or run folder")
    runs = finished_runs(path)
    if not runs:
        raise FileNotFoundError(f"{path}: no <job>/metrics.json below it (is it a finished sweep?)")
    return runs


def _snapshot_names(run: Path, metrics: dict, config) -> list[str]:
    if metrics.get("snapshots"):
        return list(metrics["snapshots"])
    weights = run / WEIGHTS_NAME
    if weights.is_file():
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as f:
            return json.loads(f.metadata()["config"])["snapshot_names"]
    return list(select(config, "data.snapshots", []))


def _steps(names: list[str], config) -> list[int]:
    path = select(config, "data.path")
    try:
        manifest = read_manifest(path) if path else None
    except FormatError:
        manifest = None
    return snapshot_steps(names, manifest)


def collect_runs(source: str | Path | list) -> pd.DataFrame:
    """One row per run: job (its path below the sweep folder), kind (crosscoder / sae), d_sae, l1_coef,
    activation, explained_variance, l0, dead_fraction, and per snapshot ev_<name> / l0_<name> / step_<name>."""
    rows = []
    for run in run_folders(source):
        job = _job_name(run, source)
        metrics, config = read_metrics(run), read_config(run)
        names = _snapshot_names(run, metrics, config)
        row = {"job": job, "run": str(run), "kind": "crosscoder" if len(names) > 1 else "sae",
               "n_snapshots": len(names), "snapshots": ",".join(names)}
        for column, key in SWEEP_COLUMNS.items():  # hyperparameters missing from metrics.json: from the config
            row[column] = metrics.get(key, None if key.startswith("val/") else select(config, f"crosscoder.{key}"))
        for name, step in zip(names, _steps(names, config)):
            ev = metrics.get(f"val/explained_variance/{name}")
            row[f"ev_{name}"] = ev if ev is not None else (row["explained_variance"] if len(names) == 1 else None)
            row[f"l0_{name}"] = metrics.get(f"val/l0/{name}", row["l0"])  # L0_DEFINITION, never a thresholded count
            row[f"step_{name}"] = step
        rows.append(row)
    runs = pd.DataFrame(rows)
    for col in [c for c in runs.columns if c.startswith("step_")]:
        runs[col] = runs[col].astype("Int64")  # NaN for runs without that snapshot; steps stay integers
    return runs


def _job_name(run: Path, source) -> str:
    for root in (source if isinstance(source, (list, tuple)) or OmegaConf.is_list(source) else [source]):
        if run != Path(root) and Path(root) in run.parents:
            return str(run.relative_to(root))
    return run.name


def snapshot_steps_of(runs: pd.DataFrame) -> dict[str, int]:
    """{snapshot name: step} over every run, ordered by step."""
    pairs = {c[5:]: int(v) for c in runs.columns if c.startswith("step_") for v in runs[c].dropna()[:1]}
    return dict(sorted(pairs.items(), key=lambda kv: kv[1]))


def pareto_front(l0: np.ndarray, ev: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower L0 and higher EV), by increasing L0."""
    l0, ev = np.asarray(l0, dtype=float), np.asarray(ev, dtype=float)
    keep, best = [], -np.inf
    for i in np.lexsort((-ev, l0)):
        if np.isfinite(ev[i]) and np.isfinite(l0[i]) and ev[i] > best:
            keep.append(int(i))
            best = ev[i]
    return np.array(keep, dtype=int)


def sae_baselines(runs: pd.DataFrame, names: list[str]) -> list[dict]:
    """Single-snapshot SAE points for a crosscoder over ``names``: run, snapshot, step, EV, L0."""
    out = []
    for _, r in runs[runs.kind == "sae"].iterrows():
        name = r.snapshots
        if name in names:
            out.append({"run": r.run, "snapshot": name, "step": int(r[f"step_{name}"]),
                        "explained_variance": r[f"ev_{name}"], "l0": r[f"l0_{name}"]})
    return out


def _plain_log_axis(axis) -> None:
    """Log-scale ticks written as plain numbers (20, 30, 100) instead of 2x10^1."""
    def minor(v: float, _) -> str:  # label 2, 3 and 5 x 10^k only, so labels never collide
        return f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (2, 3, 5) else ""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))


def _label(r: pd.Series) -> str:
    l1 = f"{r.l1_coef:g}" if isinstance(r.l1_coef, (int, float)) and pd.notna(r.l1_coef) else "?"
    return f"{r.d_sae}/{l1}" + (f" @{r.snapshots}" if r.kind == "sae" else "")


def fig_pareto(runs: pd.DataFrame):
    """5a. Overall explained variance against L0 for every run, with each kind's Pareto frontier."""
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    styles = {"crosscoder": ("o", "#4c72b0"), "sae": ("^", "#c44e52")}
    for kind, group in runs.groupby("kind"):
        marker, color = styles[kind]
        g = group.dropna(subset=["l0", "explained_variance"])
        d_sae = pd.to_numeric(g.d_sae, errors="coerce").fillna(1).to_numpy(dtype=float)
        sizes = 30 + 60 * np.log2(d_sae / d_sae.min()) if len(g) else 30
        ax.scatter(g.l0, g.explained_variance, marker=marker, s=sizes, color=color, alpha=0.75,
                   label=f"{'crosscoders' if kind == 'crosscoder' else 'single-snapshot SAEs'} ({len(g)})")
        front = g.iloc[pareto_front(g.l0.to_numpy(), g.explained_variance.to_numpy())]
        ax.plot(front.l0, front.explained_variance, "-", color=color, lw=1.5, label=f"{kind} Pareto frontier")
        for _, r in g.iterrows():
            ax.annotate(_label(r), (r.l0, r.explained_variance), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color="#555")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("L0: latents with f > 0 per token (log scale)")
    ax.set_ylabel("explained variance (all snapshots)")
    ax.set_title("Explained variance against L0 (labels: d_sae / l1_coef; size ~ d_sae)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def fig_crosscoder_vs_sae(runs: pd.DataFrame):
    """5b. (a) EV per snapshot of each crosscoder and of SAEs at their snapshot, coloured by L0;
    (b) EV against L0 on the last snapshot that has SAEs, with both frontiers."""
    steps = snapshot_steps_of(runs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    l0_all = runs.l0.astype(float).dropna()
    norm = matplotlib.colors.LogNorm(vmin=max(l0_all.min(), 1e-3), vmax=max(l0_all.max(), 1e-3) * 1.0001) \
        if len(l0_all) else None
    cmap = plt.get_cmap("viridis")
    for _, r in runs[runs.kind == "crosscoder"].iterrows():
        names = r.snapshots.split(",")
        a.plot(log_x([steps[n] for n in names]), [r[f"ev_{n}"] for n in names], "o-", ms=3, lw=1,
               color=cmap(norm(r.l0)) if norm and pd.notna(r.l0) else "gray")
    sae = runs[runs.kind == "sae"]
    for _, r in sae.iterrows():
        a.scatter(log_x([steps[r.snapshots]]), [r[f"ev_{r.snapshots}"]], marker="^", s=70, edgecolor="k",
                  color=cmap(norm(r.l0)) if norm and pd.notna(r.l0) else "gray", zorder=3)
    if norm:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=a, label="L0 (f > 0 per token)")
        _plain_log_axis(bar.ax.yaxis)
    set_step_axis(a, list(steps.values()))
    a.set_ylabel("explained variance at the snapshot")
    a.set_title("(a) Per snapshot: crosscoders (lines) vs SAEs (triangles)")
    a.grid(alpha=0.3)
    if sae.empty:
        b.text(0.5, 0.5, "no single-snapshot SAE runs in this sweep\n(train them with data.snapshots=[<name>])",
               ha="center", va="center", transform=b.transAxes)
        b.set_axis_off()
        return fig
    target = max(sae.snapshots.unique(), key=lambda n: steps[n])
    for kind, group, marker, color in (("crosscoder", runs[runs.kind == "crosscoder"], "o", "#4c72b0"),
                                       ("sae", sae[sae.snapshots == target], "^", "#c44e52")):
        if f"ev_{target}" not in group or group.empty:
            continue
        g = group.dropna(subset=[f"ev_{target}", f"l0_{target}"])
        ax_l0, ax_ev = g[f"l0_{target}"].astype(float), g[f"ev_{target}"].astype(float)
        b.scatter(ax_l0, ax_ev, marker=marker, color=color, s=50, alpha=0.8,
                  label="crosscoders" if kind == "crosscoder" else f"SAEs on {target}")
        front = pareto_front(ax_l0.to_numpy(), ax_ev.to_numpy())
        b.plot(ax_l0.to_numpy()[front], ax_ev.to_numpy()[front], "-", color=color, lw=1.5)
    b.set_xscale("log")
    _plain_log_axis(b.xaxis)
    b.set_xlabel("L0: latents with f > 0 per token (log scale)")
    b.set_ylabel(f"explained variance on {target}")
    b.set_title(f"(b) Pareto frontiers on {target} (step {steps[target]})")
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)
    return fig


def sweep_summary(runs: pd.DataFrame) -> dict:
    out = {"runs": len(runs), "snapshot_steps": snapshot_steps_of(runs), "l0_definition": L0_DEFINITION, "frontier": {}}
    for kind, g in runs.groupby("kind"):
        g = g.dropna(subset=["l0", "explained_variance"])
        front = g.iloc[pareto_front(g.l0.to_numpy(), g.explained_variance.to_numpy())]
        out["frontier"][kind] = front[["job", "d_sae", "l1_coef", "l0", "explained_variance"]].to_dict("records")
    return out


def sweep_figures(runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write figures 5a and 5b as PNG into out_dir; returns their paths."""
    return [save_figure(fig_pareto(runs), out_dir / "fig5_pareto.png"),
            save_figure(fig_crosscoder_vs_sae(runs), out_dir / "fig5_crosscoder_vs_sae.png")]


def save_tables(runs: pd.DataFrame, out_dir: Path) -> None:
    """runs.csv (one row per run) and sweep_analysis.json (sweep_summary) in out_dir."""
    from analysis.summary import write_json
    with atomic_path(out_dir / "runs.csv") as tmp:
        runs.to_csv(tmp, index=False)
    write_json(out_dir / "sweep_analysis.json", sweep_summary(runs))
