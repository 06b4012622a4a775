"""Read a trained crosscoder (or a sweep of them): the paper's feature-evolution figures, tables and report.

    python analyze.py run=<run folder>        # -> <run>/analysis/{features.parquet,csv, summary.json, fig*.png,
                                              #    browser.json, report.html, tensorboard/}
    python analyze.py run=<run folder> attribution=induction   # + <run>/analysis/attribution/induction/
                                              #    {attribution.json, top_features.csv, attribution.npz, fig7*.png}
    python analyze.py sweep=<multirun folder> # -> <sweep>/analysis/{runs.csv, sweep_analysis.json, fig5*.png,
                                              #    report.html, tensorboard/}

This file only composes the pieces in analysis/ (definitions: docs/ANALYSIS.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from analysis import attribution, browser, evolution, figures, report, run_files, summary, sweep, synthetic_check  # noqa: E402
from analysis.activations import activation_pass  # noqa: E402
from analysis.attribution_figure import fig_attribution  # noqa: E402
from analysis.config import check, register  # noqa: E402
from cli import one_line_errors, quiet_library_noise  # noqa: E402
from data.format import atomic_path, write_atomic  # noqa: E402

register()

CAPTIONS = {
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
    "fig5_pareto": "5a. Explained variance against L0 for every run, with Pareto frontiers (paper Fig. 2). "
                   f"{sweep.L0_DEFINITION}.",
    "fig5_crosscoder_vs_sae": "5b. Crosscoders against single-snapshot SAEs trained on the same data "
                              f"(paper Fig. 3c). {sweep.L0_DEFINITION}.",
}


def _out_dir(cfg: DictConfig, default: Path) -> Path:
    out = Path(cfg.out) if cfg.out else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def _baselines(cfg: DictConfig, run: run_files.RunFiles) -> list[dict]:
    """Single-snapshot SAEs: cfg.baselines, else the other runs of the sweep folder the run sits in (as a
    job, or as one dictionary of a job that trained several)."""
    source = cfg.baselines
    if source is None:
        source = next((p for p in run.run_dir.parents[:2] if (p / "sweep_summary.csv").is_file()), None)
    return sweep.sae_baselines(sweep.collect_runs(source), run.names) if source is not None else []


def attribute(cfg: DictConfig, run: run_files.RunFiles, table, out: Path) -> Path:
    """The task's attribution at every snapshot -> <out>/attribution/<task>/ (and TensorBoard)."""
    task, prompts, site, results, split = attribution.run(run, cfg.attribution, cfg.device)
    facts = attribution.summarise(task, prompts, site, results, table, cfg.attribution, split)
    folder = out / "attribution" / facts["task"]  # <task>, or <task>_local for attribution.code=local
    attribution.save(facts, results, folder)
    png = figures.save_figure(fig_attribution(facts, np.stack([r.ig for r in results]), table),
                              folder / attribution.FIGURE_NAME)
    if cfg.tensorboard:
        attribution.log_scalars(facts, out / "tensorboard")
        figures.log_to_tensorboard([png], out / "tensorboard")
    check = facts["causal_check"]
    print(f"attribution ({facts['task']}): learned at {check['learned_snapshots']} of {len(results)} snapshots (test "
          f"prompts); causal check at k={check['k']} passed at {check['passed']}; {folder}")
    return folder


def analyze_run(cfg: DictConfig) -> Path:
    run = run_files.load_run(cfg.run, device=cfg.device)
    out = _out_dir(cfg, run.run_dir / "analysis")
    names, steps, model = run.names, run.steps, run.model
    views = sorted(set(np.linspace(0, len(names) - 1, max(cfg.browser_snapshots, 0)).round().astype(int).tolist()))
    stats = None
    if run.manifest is not None:
        stats = activation_pass(model, run.data_path, run.manifest, run.val_shards, cfg.max_tokens, cfg.batch_size,
                                cfg.active_threshold, views, cfg.n_contexts, cfg.device)
    table = evolution.feature_table(model.W_dec, names, steps, cfg.emergence_fraction,
                                    stats.fired if stats else None, stats.active if stats else None)
    present = evolution.presence(evolution.norm_matrix(table, names), cfg.emergence_fraction)
    projection = evolution.projection_matrix(model.W_dec, present & (table.category != "dead").to_numpy()[:, None])
    facts = summary.build_summary(
        run_dir=str(run.run_dir), names=names, steps=steps, table=table, metrics=run.metrics, stats=stats,
        projection=projection, d_model=model.d_model, activation=model.activation,
        emergence_fraction=cfg.emergence_fraction, active_threshold=cfg.active_threshold,
        loss_curve=run_files.find_loss_curve(run), baselines=_baselines(cfg, run))
    evolution.save_table(table, out)
    synthetic_check.write(run, table, out, cfg.emergence_fraction)  # only when the dataset holds a synthetic truth
    write_atomic(out / "summary.json", json.dumps(facts, indent=1))
    pngs = figures.run_figures(table, facts, out)
    if cfg.tensorboard:
        figures.log_to_tensorboard(pngs, out / "tensorboard")
    entries = []
    if stats is not None:
        entries = browser.browser_entries(table, stats, names, steps, cfg.n_browser_features,
                                          run_files.load_token_decoder(run), cfg.context_before,
                                          cfg.context_after, cfg.seed)
    write_atomic(out / "browser.json", json.dumps(summary.clean(entries), indent=1))
    if cfg.attribution is not None:
        attribute(cfg, run, table, out)
    done = [(r, out / "attribution" / r["task"] / attribution.FIGURE_NAME) for r in attribution.load_results(out)]
    page = report.run_report(facts, [(p, CAPTIONS[p.stem]) for p in pngs], entries, out / "report.html",
                             [(r, fig if fig.is_file() else None) for r, fig in done])
    print(f"analysis of {run.run_dir}: {facts['categories']}, turning point step {facts['turning_point_step']}\n"
          f"report: {page}")
    return out


def analyze_sweep(cfg: DictConfig) -> Path:
    extra = cfg.baselines if OmegaConf.is_list(cfg.baselines) else [cfg.baselines] if cfg.baselines else []
    runs = sweep.collect_runs([str(cfg.sweep), *map(str, extra)])
    out = _out_dir(cfg, Path(cfg.sweep) / "analysis")
    with atomic_path(out / "runs.csv") as tmp:
        runs.to_csv(tmp, index=False)
    facts = summary.clean(sweep.sweep_summary(runs))
    write_atomic(out / "sweep_analysis.json", json.dumps(facts, indent=1))
    pngs = [figures.save_figure(sweep.fig_pareto(runs), out / "fig5_pareto.png"),
            figures.save_figure(sweep.fig_crosscoder_vs_sae(runs), out / "fig5_crosscoder_vs_sae.png")]
    if cfg.tensorboard:
        figures.log_to_tensorboard(pngs, out / "tensorboard")
    cols = ["job", "kind", "snapshots", "d_sae", "l1_coef", "activation", "l0", "explained_variance", "dead_fraction"]
    sections = [("Runs", report.table_html(cols, runs[cols].astype(object).where(runs[cols].notna(), None)
                                           .values.tolist())),
                ("Figures", "".join(report.figure_html(p, CAPTIONS[p.stem]) for p in pngs))]
    page = out / "report.html"
    write_atomic(page, report.render(f"Sweep analysis: {Path(cfg.sweep).name}", sections,
                                     f'<p class="meta">{len(runs)} runs from {cfg.sweep}</p>'))
    print(f"sweep of {len(runs)} runs; report: {page}")
    return out


@hydra.main(config_path="conf/analyze", config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_library_noise()
    with one_line_errors():
        check(cfg)
        analyze_run(cfg) if cfg.run is not None else analyze_sweep(cfg)


if __name__ == "__main__":
    main()
