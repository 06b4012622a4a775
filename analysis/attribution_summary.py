"""What a task's attribution writes (analysis/attribution.py computes it): the summary attribution.json that the
figure, the report and TensorBoard read, top_features.csv, attribution.npz, and the TensorBoard scalars.

Only numpy and pandas here (no torch, no splice), so the report and the figure read attribution.json cheaply.
Every share of a gap is None (null) where that gap is below ``min_gap``: a share of an effect below it is a ratio
of noise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data.format import atomic_path

if TYPE_CHECKING:
    from analysis.attribution import Site, SnapshotAttribution
    from analysis.tasks import TaskPrompts

RESULT_FILE = "attribution.json"
FIGURE_NAME = "fig7_attribution.png"


def at_k(snapshot: dict, key: str, k: int, missing=None):
    """A per-k list of one snapshot of attribution.json (``break_top``, ...) read at set size k; ``missing`` where
    k was not usable there (capped at the features the corruption changes)."""
    return snapshot[key][snapshot["ks"].index(k)] if k in snapshot["ks"] else missing


def share(part: float, gap: float, min_gap: float) -> float | None:
    """part / gap where the gap is at least min_gap, else None: a share of an effect below min_gap is a ratio
    of noise and is not reported."""
    return float(part / gap) if gap >= min_gap else None


def gap_closed(result: SnapshotAttribution, metric: float, min_gap: float) -> float | None:
    """Share of the way from the clean metric to the corrupted baseline (test half) that ``metric`` has moved
    (0: not at all, 1: all the way); None where that gap is below min_gap (the task is not learned there)."""
    return share(result.metric_clean - metric, result.metric_clean - result.metric_baseline, min_gap)


def _mean_std(rows: list[list[float | None]]) -> tuple[list[float | None], list[float | None]]:
    """Per k: mean and standard deviation over the draws; None where there is no draw or a draw is None."""
    ok = [bool(row) and None not in row for row in rows]
    return ([float(np.mean(row)) if good else None for row, good in zip(rows, ok)],
            [float(np.std(row)) if good else None for row, good in zip(rows, ok)])


def summarise(task, prompts: TaskPrompts, site: Site, results: list[SnapshotAttribution], table: pd.DataFrame | None,
              cfg: Any, split: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """attribution.json: everything the figure, the report and TensorBoard show. Per snapshot the top-level
    metrics are the test half's (the causal check); ``selection`` holds the selection half's, over whose gap the
    attribution shares are taken. Every share is None where its gap is below ``min_gap``."""
    snapshots = []
    mg = cfg.min_gap
    for r in results:
        gap = r.metric_clean - r.metric_baseline
        sel_gap = r.select_clean - r.select_baseline
        top = np.argsort(-r.ig, kind="stable")[:cfg.n_top]
        rand_mean, rand_std = _mean_std(r.break_random)
        closed_mean, closed_std = _mean_std([[gap_closed(r, m, mg) for m in row] for row in r.break_random])
        snapshots.append({
            "name": r.name, "step": r.step, "metric_clean": r.metric_clean, "metric_corrupted": r.metric_corrupted,
            "metric_baseline": r.metric_baseline, "gap": gap, "learned": bool(gap >= mg),
            "selection": {"metric_clean": r.select_clean, "metric_baseline": r.select_baseline, "gap": sel_gap,
                          "learned": bool(sel_gap >= mg)},
            "sum_ig": float(r.ig.sum()), "error_ig": r.error_ig,
            "feature_share": share(float(r.ig.sum()), sel_gap, mg), "error_share": share(r.error_ig, sel_gap, mg),
            "completeness_error": float(r.ig.sum() + r.error_ig - sel_gap),
            "n_changed": int(r.changed.sum()),
            "ks": r.ks,
            "break_top": r.break_top, "break_random_mean": rand_mean, "break_random_std": rand_std,
            "break_random": r.break_random, "restore_top": r.restore_top,
            "size_top": r.size_top, "size_random_mean": (size_rand := _mean_std(r.size_random)[0]),
            "control_size_ratio": [None if m is None or t <= 0 else m / t for m, t in zip(size_rand, r.size_top)],
            "break_top_closed": [gap_closed(r, m, mg) for m in r.break_top],
            "break_random_closed_mean": closed_mean, "break_random_closed_std": closed_std,
            "restore_top_recovered": [None if (c := gap_closed(r, m, mg)) is None else 1 - c for m in r.restore_top],
            "top_features": [_feature_row(r, i, sel_gap, mg, table) for i in top],
        })
    learned = [s for s in snapshots if s["learned"]]
    k = cfg.show_k
    verdicts = []
    for s in learned:
        if k in s["ks"]:
            top_c, rand_c = at_k(s, "break_top_closed", k), at_k(s, "break_random_closed_mean", k)
            verdicts.append(top_c >= 0.5 and rand_c is not None and rand_c < 0.5 * top_c)
    sel, test = split if split is not None else (np.arange(len(prompts.clean)), np.arange(len(prompts.clean)))
    code = getattr(cfg, "code", "joint")
    return {
        "task": task.name + ("_local" if code == "local" else ""), "metric": task.metric, "code": code,
        "task_config": {f.name: (v.config() if hasattr(v := getattr(task, f.name), "config") else v)
                        for f in dataclasses.fields(task)},  # a corpus is recorded by its configuration
        "n_prompts": int(len(prompts.clean)), "prompt_tokens": int(prompts.clean.shape[1]),
        "split": {"selection": int(len(sel)), "test": int(len(test)),
                  "rule": "attributions and the top-k choice on the selection prompts, the causal check on the "
                          "test prompts; pairs sharing a prompt stay in one half"},
        "examples": [dict(zip(("clean", "corrupted", "answer", "wrong"), e)) for e in prompts.examples],
        "model": site._asdict(), "ig_steps": cfg.ig_steps, "random_sets": cfg.random_sets, "show_k": k,
        "match_candidates": getattr(cfg, "match_candidates", None),
        "min_gap": mg, "snapshots": snapshots,
        "shares": "every share of a gap (feature_share, error_share, share_of_gap, *_closed, *_recovered) is null "
                  "where that gap (selection half for attributions, test half for the causal check) is below min_gap",
        "causal_check": {"k": k, "learned_snapshots": len(learned), "passed": int(sum(verdicts)),
                         "rule": "at a snapshot where the task is learned on the test prompts (clean - baseline >= "
                                 "min_gap), breaking the top k features (chosen on the selection prompts) closes >= "
                                 "50% of the gap and the matched random sets close < half of what the top k close"},
    }


def _feature_row(r: SnapshotAttribution, i: int, gap: float, min_gap: float, table: pd.DataFrame | None) -> dict:
    row = {"feature": int(i), "ig": float(r.ig[i]), "atp": float(r.atp[i]), "share_of_gap": share(r.ig[i], gap, min_gap),
           "size": float(r.size[i])}
    if table is not None:
        t = table.iloc[int(i)]
        row.update(category=str(t.category), emergence_step=None if pd.isna(t.emergence_step) else int(t.emergence_step),
                   peak_step=int(t.peak_step), norm_rel=float(t[f"norm_{r.name}"] / t.max_norm) if t.max_norm > 0 else 0.0)
    return row


def top_features_frame(summary: dict) -> pd.DataFrame:
    """top_features.csv: one row per (snapshot, rank)."""
    rows = [{"snapshot": s["name"], "step": s["step"], "rank": rank + 1, **f}
            for s in summary["snapshots"] for rank, f in enumerate(s["top_features"])]
    return pd.DataFrame(rows)


def save(summary: dict, results: list[SnapshotAttribution], out: Path) -> None:
    """attribution.json, top_features.csv and attribution.npz ([S, F] ig / atp, every feature) in ``out``."""
    from analysis.summary import write_json
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULT_FILE, summary)
    with atomic_path(out / "top_features.csv") as tmp:
        top_features_frame(summary).to_csv(tmp, index=False)
    with atomic_path(out / "attribution.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, names=np.array([r.name for r in results]), steps=np.array([r.step for r in results]),
                            ig=np.stack([r.ig for r in results]), atp=np.stack([r.atp for r in results]))


def task_dir(analysis_dir: Path, task: str) -> Path:
    """Where a task's attribution goes: <analysis>/attribution/<task>/ (<task>_local for attribution.code=local)."""
    return Path(analysis_dir) / "attribution" / task


def load_results(analysis_dir: Path) -> list[tuple[dict, Path | None]]:
    """Every attribution.json under <analysis>/attribution/<task>/, by task name, with its figure (None when it
    was not drawn)."""
    out = []
    for path in sorted((Path(analysis_dir) / "attribution").glob(f"*/{RESULT_FILE}")):
        figure = path.parent / FIGURE_NAME
        out.append((json.loads(path.read_text()), figure if figure.is_file() else None))
    return out


def log_scalars(summary: dict, log_dir: Path) -> None:
    """The per-snapshot numbers as TensorBoard scalars under attribution/<task>/, at the snapshot's training step."""
    from torch.utils.tensorboard import SummaryWriter
    k, task = summary["show_k"], summary["task"]
    writer = SummaryWriter(str(log_dir))
    try:
        for s in summary["snapshots"]:
            values = {"metric_clean": s["metric_clean"], "metric_corrupted": s["metric_corrupted"],
                      "metric_baseline": s["metric_baseline"], "completeness_error": s["completeness_error"],
                      "feature_share": s["feature_share"], "error_share": s["error_share"]}
            if k in s["ks"]:
                values.update({f"break_top{k}": at_k(s, "break_top", k),
                               f"break_random{k}": at_k(s, "break_random_mean", k),
                               f"restore_top{k}": at_k(s, "restore_top", k)})
            for name, v in values.items():
                if v is not None:  # a share below min_gap is not a result
                    writer.add_scalar(f"attribution/{task}/{name}", v, s["step"])
    finally:
        writer.close()
