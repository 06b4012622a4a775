"""Checks analyze.py's own evolution table against the planted truth, when the run trained on data.synthetic data.

    <out>/synthetic_check.json    written only when the run's dataset folder holds truth.safetensors / truth.json

Each true feature is matched to a learned latent by data.synthetic.feature_recovery (mean cosine over the
snapshots where the feature exists; recovered at >= 0.9). For the recovered ones the table's columns of the
matched latent are compared with the truth in the table's own unit (normalised: raw activation x scale[s]):

    peak_index      against argmax_s strength[i, s] x scale[s]   (the true peak in normalised units)
    emergence_index against truth.birth                          (first snapshot where the feature exists)
    end_index       against truth.death - 1                      (last snapshot where it exists)

plus, for reference, the table's norms read in raw units (norm_<s> / scale[s]) against the raw truth's peak.
This is what the README's claims about peaks and births on synthetic data are measured with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.evolution import end_index
from analysis.summary import write_json
from data.synthetic import CATEGORIES, TRUTH_JSON, TRUTH_TENSORS, feature_recovery, load_truth, true_normalised_strength

FILE_NAME = "synthetic_check.json"


def _frac(ok: np.ndarray) -> float | None:
    return float(ok.mean()) if ok.size else None


def compare(table: pd.DataFrame, W_dec, scale, truth, emergence_fraction: float) -> dict[str, Any]:
    """The check's facts (module docstring) for a table built from W_dec [F, S, D] (normalised) and scale [S]."""
    rec = feature_recovery(W_dec, truth, scale=scale, emergence_fraction=emergence_fraction)
    ok = rec["recovered"].numpy()
    true_idx = np.flatnonzero(ok)
    latents = rec["match"].numpy()[ok]
    rows = table.iloc[latents]
    S = truth.strength.shape[1]
    norms = rows[[c for c in table.columns if c.startswith("norm_") and c != "norm_change"]].to_numpy(np.float64)
    if norms.shape[1] != S:
        raise ValueError(f"synthetic check: the table has {norms.shape[1]} snapshots, the truth {S}")
    scale_np = np.asarray(scale, dtype=np.float64).reshape(-1)
    peak_true = rec["peak_true"].numpy()[ok]
    true_norm = true_normalised_strength(truth, scale_np)
    checks = {
        "peak": (rows.peak_index.to_numpy(dtype=int), peak_true),
        "emergence": (rows.emergence_index.to_numpy(dtype=int, na_value=-1), truth.birth[ok]),
        "end": (rows.end_index.to_numpy(dtype=int, na_value=-1), truth.death[ok] - 1),
        "peak_raw": ((norms / scale_np[None]).argmax(1), truth.peak[ok]),
    }
    category = truth.category[ok]
    facts: dict[str, Any] = {
        "unit": "normalised (raw activation x scale[s]), as the table; peak_raw reads the table's norms / scale",
        "emergence_fraction": emergence_fraction, "scale": scale_np.tolist(),
        "n_true": int(len(ok)), "n_recovered": int(ok.sum()), "recovered_frac": float(ok.mean()),
        "distinct_latents": int(len(set(latents.tolist()))),
        "birth_definition_frac": rec["birth_definition_frac"],
        # what an exact decoder scores on the end check: the share of true features whose own normalised profile is
        # still present (>= emergence_fraction x its peak) at death - 1; a late snapshot shrunk by its scale can fall below
        "end_definition_frac": float((end_index(true_norm, emergence_fraction) == truth.death - 1).mean()),
    }
    for name, (learned, true) in checks.items():
        right = learned == true
        facts[f"{name}_match_frac"] = _frac(right)
        facts[f"{name}_match_frac_by_category"] = {c: _frac(right[category == k]) for k, c in enumerate(CATEGORIES)}
    facts["mismatches"] = [
        {"true_feature": int(i), "latent": int(j), "category": CATEGORIES[int(truth.category[i])],
         **{f"{name}_table": int(learned[n]) for name, (learned, _) in checks.items()},
         **{f"{name}_truth": int(true[n]) for name, (_, true) in checks.items()}}
        for n, (i, j) in enumerate(zip(true_idx, latents))
        if any(learned[n] != true[n] for name, (learned, true) in checks.items() if name != "peak_raw")]
    return facts


def write(run, table: pd.DataFrame, out: Path, emergence_fraction: float) -> Path | None:
    """<out>/synthetic_check.json for a run whose dataset holds the synthetic truth; None (nothing written) otherwise,
    or when the run trained on a subset of the dataset's snapshots (the truth is stated for all of them)."""
    folder = run.data_path
    if folder is None or not all((Path(folder) / n).is_file() for n in (TRUTH_TENSORS, TRUTH_JSON)):
        return None
    if run.manifest is None or run.names != run.manifest.snapshot_names:
        return None
    facts = compare(table, run.crosscoder.W_dec, run.crosscoder.scale, load_truth(folder), emergence_fraction)
    path = Path(out) / FILE_NAME
    write_json(path, facts)
    pct = {k: "n/a" if facts[k] is None else f"{facts[k]:.1%}" for k in ("peak_match_frac", "emergence_match_frac")}
    print(f"synthetic check: {facts['n_recovered']}/{facts['n_true']} true features recovered; among them the "
          f"table's peak is right for {pct['peak_match_frac']}, emergence for {pct['emergence_match_frac']} "
          f"(normalised units); {path}")
    return path
