"""Read a trained crosscoder (or a sweep of them): the paper's feature-evolution figures, tables and report.

    python analyze.py run=<run folder>        # -> <run>/analysis/{features.parquet,csv, summary.json, fig*.png,
                                              #    browser.json, report.html, tensorboard/}
    python analyze.py run=<run folder> attribution=induction   # + <run>/analysis/attribution/induction/
                                              #    {attribution.json, top_features.csv, attribution.npz, fig7*.png}
    python analyze.py sweep=<multirun folder> # -> <sweep>/analysis/{runs.csv, sweep_analysis.json, fig5*.png,
                                              #    report.html, tensorboard/}
A run whose dataset holds a planted-feature truth (python -m data.synthetic) also gets synthetic_check.json: the
table's peak, emergence and end columns against the truth, in the same (normalised) units.

This file only composes the pieces in analysis/ (definitions: docs/ANALYSIS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from analysis import (  # noqa: E402
    attribution,
    attribution_summary,
    browser,
    evolution,
    figures,
    report,
    run_files,
    summary,
    sweep,
    synthetic_check,
)
from analysis.activations import activation_pass, browser_views  # noqa: E402
from analysis.attribution_figure import fig_attribution  # noqa: E402
from analysis.config import check, register  # noqa: E402
from cli import one_line_errors, quiet_library_noise  # noqa: E402
from data.run_folder import TENSORBOARD_DIR, is_sweep_folder  # noqa: E402

register()


def _out_dir(cfg: DictConfig, default: Path) -> Path:
    out = Path(cfg.out) if cfg.out else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def _baselines(cfg: DictConfig, run: run_files.RunFiles) -> list[dict]:
    """Single-snapshot SAEs: cfg.baselines, else the other runs of the sweep folder the run sits in (as a
    job, or as one dictionary of a job that trained several)."""
    source = cfg.baselines
    if source is None:
        source = next((p for p in run.run_dir.parents[:2] if is_sweep_folder(p)), None)
    return sweep.sae_baselines(sweep.collect_runs(source), run.names) if source is not None else []


def attribute(cfg: DictConfig, run: run_files.RunFiles, table, out: Path) -> Path:
    """The task's attribution at every snapshot -> <out>/attribution/<task>/ (and TensorBoard)."""
    task, prompts, site, results, split = attribution.run(run, cfg.attribution, cfg.device)
    facts = attribution_summary.summarise(task, prompts, site, results, table, cfg.attribution, split)
    folder = attribution_summary.task_dir(out, facts["task"])
    attribution_summary.save(facts, results, folder)
    png = figures.save_figure(fig_attribution(facts, np.stack([r.ig for r in results]), table),
                              folder / attribution_summary.FIGURE_NAME)
    if cfg.tensorboard:
        attribution_summary.log_scalars(facts, out / TENSORBOARD_DIR)
        figures.log_to_tensorboard([png], out / TENSORBOARD_DIR)
    check = facts["causal_check"]
    print(f"attribution ({facts['task']}): learned at {check['learned_snapshots']} of {len(results)} snapshots (test "
          f"prompts); causal check at k={check['k']} passed at {check['passed']}; {folder}")
    return folder


def analyze_run(cfg: DictConfig) -> Path:
    run = run_files.load_run(cfg.run, device=cfg.device)
    out = _out_dir(cfg, run.run_dir / "analysis")
    names, steps, crosscoder = run.names, run.steps, run.crosscoder
    stats = None
    if run.manifest is not None:
        stats = activation_pass(crosscoder, run.data_path, run.manifest, run.val_shards, cfg.max_tokens, cfg.batch_size,
                                cfg.active_threshold, browser_views(len(names), cfg.browser_snapshots), cfg.n_contexts,
                                cfg.device)
    table = evolution.feature_table(crosscoder.W_dec, names, steps, cfg.emergence_fraction,
                                    stats.fired if stats else None, stats.active if stats else None)
    facts = summary.build_summary(
        run_dir=str(run.run_dir), names=names, steps=steps, table=table, metrics=run.metrics, stats=stats,
        projection=evolution.live_projection(crosscoder.W_dec, table, names, cfg.emergence_fraction),
        d_model=crosscoder.d_model, activation=crosscoder.activation, emergence_fraction=cfg.emergence_fraction,
        active_threshold=cfg.active_threshold, loss_curve=run_files.find_loss_curve(run), baselines=_baselines(cfg, run))
    evolution.save_table(table, out)
    synthetic_check.write(run, table, out, cfg.emergence_fraction)  # only when the dataset holds a synthetic truth
    summary.write_json(out / "summary.json", facts)
    pngs = figures.run_figures(table, facts, out)
    if cfg.tensorboard:
        figures.log_to_tensorboard(pngs, out / TENSORBOARD_DIR)
    entries = []
    if stats is not None:
        entries = browser.browser_entries(table, stats, names, steps, cfg.n_browser_features,
                                          run_files.load_token_decoder(run), cfg.context_before,
                                          cfg.context_after, cfg.seed)
    summary.write_json(out / "browser.json", entries)
    if cfg.attribution is not None:
        attribute(cfg, run, table, out)
    page = report.run_report(facts, [(p, figures.CAPTIONS[p.stem]) for p in pngs], entries, out / "report.html",
                             attribution_summary.load_results(out))
    print(f"analysis of {run.run_dir}: {facts['categories']}, turning point step {facts['turning_point_step']}\n"
          f"report: {page}")
    return out


def analyze_sweep(cfg: DictConfig) -> Path:
    extra = cfg.baselines if OmegaConf.is_list(cfg.baselines) else [cfg.baselines] if cfg.baselines else []
    runs = sweep.collect_runs([str(cfg.sweep), *map(str, extra)])
    out = _out_dir(cfg, Path(cfg.sweep) / "analysis")
    sweep.save_tables(runs, out)
    pngs = sweep.sweep_figures(runs, out)
    if cfg.tensorboard:
        figures.log_to_tensorboard(pngs, out / TENSORBOARD_DIR)
    page = report.sweep_report(runs, [(p, sweep.CAPTIONS[p.stem]) for p in pngs], cfg.sweep, out / "report.html")
    print(f"sweep of {len(runs)} runs; report: {page}")
    return out


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_library_noise()
    with one_line_errors():
        check(cfg)
        analyze_run(cfg) if cfg.run is not None else analyze_sweep(cfg)


if __name__ == "__main__":
    main()
