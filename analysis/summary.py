"""summary.json: the numbers behind every figure, so other tools need not recompute anything.

    explained_variance / l0 / dead_fraction   overall and per snapshot (with their source)
    categories                                 features per category (analysis.evolution)
    median_emergence_step                      median emergence step of features born after the first snapshot
    emerged_fraction                           [S] share of live features present at or before each snapshot
    turning_point_step                         first snapshot step where emerged_fraction >= 0.5
    persistence                                of emergent/transient features: median, share >= 0.6
    projection                                 [S, S] mean decoder cosine (analysis.evolution.projection_matrix)
    loss_curve, baselines                      the suite's loss curve and single-snapshot SAE points, if any
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.activations import PassStats
from analysis.evolution import CATEGORIES
from data.format import write_atomic
from data.run_folder import METRICS_NAME


def emerged_fraction(table: pd.DataFrame, n_snapshots: int) -> np.ndarray:
    """[S]: share of live (non-dead) features whose emergence snapshot is <= s."""
    live = table[table.category != "dead"]
    if live.empty:
        return np.full(n_snapshots, np.nan)
    counts = np.bincount(live.emergence_index.to_numpy(dtype=int), minlength=n_snapshots)
    return np.cumsum(counts) / len(live)


def turning_point(fraction: np.ndarray, steps: list[int]) -> int | None:
    """Step of the first snapshot at which half the live features have emerged."""
    hit = np.flatnonzero(fraction >= 0.5)
    return int(steps[hit[0]]) if hit.size else None


def _per_snapshot(metrics: dict, key: str, names: list[str]) -> dict[str, float] | None:
    values = {n: metrics.get(f"{key}/{n}") for n in names}
    return values if all(isinstance(v, (int, float)) for v in values.values()) else None


def build_summary(*, run_dir: str, names: list[str], steps: list[int], table: pd.DataFrame, metrics: dict,
                  stats: PassStats | None, projection: tuple[np.ndarray, np.ndarray], d_model: int,
                  activation: str, emergence_fraction: float, active_threshold: float,
                  loss_curve: tuple[list[int], list[float]] | None = None,
                  baselines: list[dict] | None = None) -> dict[str, Any]:
    S = len(names)
    ev_pass = dict(zip(names, stats.explained_variance.tolist())) if stats else None
    ev_json = _per_snapshot(metrics, "val/explained_variance", names)
    ev = {"overall": metrics.get("val/explained_variance"), "per_snapshot": ev_json, "source": METRICS_NAME}
    if ev_json is None and stats is not None:
        ev = {"overall": stats.explained_variance_overall, "per_snapshot": ev_pass, "source": "activation pass"}
    ev["activation_pass"] = ev_pass
    if stats is not None:
        l0 = {"overall": stats.l0, "per_snapshot": dict(zip(names, stats.l0_per_snapshot.tolist())),
              "source": "activation pass"}
    else:
        l0 = {"overall": metrics.get("val/l0"), "per_snapshot": _per_snapshot(metrics, "val/l0", names),
              "source": METRICS_NAME}
    live = table.category != "dead"
    dead = {"overall": float((~live).mean()), "training": metrics.get("val/dead_fraction"),
            "per_snapshot": ({n: float((table[f"freq_{n}"] <= 0).mean()) for n in names} if stats else None)}
    born = table[table.category.isin(["emergent", "transient"])]
    fraction = emerged_fraction(table, S)
    mean, count = projection
    return clean({
        "run": str(run_dir),
        "snapshots": [{"name": n, "step": int(s)} for n, s in zip(names, steps)],
        "n_features": len(table), "d_model": d_model, "activation": activation,
        "emergence_fraction": emergence_fraction, "active_threshold": active_threshold,
        "tokens": ({"analysed": stats.tokens, "eval": stats.eval_tokens, "eval_held_out": stats.eval_held_out}
                   if stats else None),
        "explained_variance": ev, "l0": l0, "dead_fraction": dead,
        "categories": {c: int((table.category == c).sum()) for c in CATEGORIES},
        "median_emergence_step": float(born.emergence_step.astype(float).median()) if len(born) else None,
        "emerged_fraction": fraction.tolist(),
        "turning_point_step": turning_point(fraction, steps),
        "persistence": {"median": float(born.persistence.median()) if len(born) else None,
                        "share_at_least_0.6": float((born.persistence >= 0.6).mean()) if len(born) else None},
        "projection": {"mean": mean.tolist(), "count": count.astype(int).tolist()},
        "loss_curve": {"steps": loss_curve[0], "loss": loss_curve[1]} if loss_curve else None,
        "baselines": baselines or [],
    })


def write_json(path: Path, value: Any) -> Path:
    """``value`` made JSON-safe (clean) as indented JSON, written atomically."""
    write_atomic(path, json.dumps(clean(value), indent=1))
    return path


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python (json.dumps would write invalid NaN)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
