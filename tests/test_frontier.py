"""bench.frontier at toy size: more sparsity pressure gives a lower L0, the recovery it reports is the planted
features' best mean cosine computed independently, and the sweep writes its json / csv / png."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import bench.frontier as frontier
from data.synthetic import SyntheticConfig, make_truth

TOY = SyntheticConfig(n_snapshots=3, d_model=16, n_features=12, mean_active=2.0, rotation=0.1)


def test_recovery_is_the_planted_features_best_mean_cosine():
    torch.set_num_threads(1)
    truth = make_truth(TOY)
    row, cc = frontier.train_one(TOY, "topk", "k", 2, d_sae=32, steps=300, batch=256, heldout_batches=2,
                                 heldout_batch=1024, truth=truth)
    W = cc.W_dec.detach().double().numpy()  # [F, S, D]
    unit = W / np.linalg.norm(W, axis=-1, keepdims=True)
    best = []
    for i in range(TOY.n_features):  # mean over the snapshots where feature i exists, best latent
        where = np.flatnonzero(truth.strength[i] > 0)
        cos = np.mean([unit[:, s] @ truth.directions[i, s] for s in where], axis=0)
        best.append(cos.max())
    assert row["recovered_frac"] == pytest.approx(np.mean(np.array(best) >= 0.9))
    assert row["recovered_frac"] >= 0.5  # the toy dictionary is mostly learned, so the check is not vacuous
    assert row["l0"] == pytest.approx(2.0)  # TopK: exactly k per token
    assert row["n_tokens"] == 300 * 256 and 0 <= row["dead_fraction"] <= 1 and 0.5 < row["explained_variance"] <= 1


def test_sweep_orders_l0_by_l1_coef_and_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "DATASETS", {"default": TOY})
    monkeypatch.setattr(frontier, "SETTINGS", {"relu": ("l1_coef", [0.3, 10.0])})
    out = tmp_path / "results" / "new"  # a folder that does not exist yet: made before the first run finishes
    frontier.main(["--steps", "200", "--batch", "256", "--d-sae", "32", "--jobs", "1", "--out", str(out)])
    runs = json.loads((out / "frontier.json").read_text())["runs"]
    assert [(r["activation"], r["value"]) for r in runs] == [("relu", 0.3), ("relu", 10.0)]
    assert runs[1]["l0"] < 0.7 * runs[0]["l0"]  # 33x the L1 weight: a clearly sparser code
    with open(out / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[1]["l0"]) == pytest.approx(runs[1]["l0"])
    assert set(frontier.COLUMNS) <= set(runs[0])
    import matplotlib.pyplot as plt
    img = plt.imread(out / "frontier.png")
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05
    assert not (out / "frontier.partial.json").exists()
