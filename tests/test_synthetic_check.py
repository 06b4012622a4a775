"""analysis.synthetic_check: analyze.py's table against the planted truth, in the table's own (normalised) unit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import evolution
from analysis.synthetic_check import compare
from data.synthetic import SyntheticConfig, make_truth

SCALE = torch.tensor([4.0, 2.0, 1.0, 0.8])


def planted(truth, scale: torch.Tensor) -> torch.Tensor:
    """The true atoms in normalised units, each latent times a random positive factor, plus 16 random latents."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.from_numpy(truth.atoms()) * scale[None, :, None]
    atoms = atoms * torch.empty(len(atoms), 1, 1).uniform_(0.5, 2, generator=g)
    return torch.cat([atoms, torch.randn(16, *atoms.shape[1:], generator=g)])


def table_of(W: torch.Tensor):
    S = W.shape[1]
    return evolution.feature_table(W, [f"step{s}" for s in range(S)], list(range(S)), 0.2)


def test_the_truth_passes_and_a_moved_peak_or_birth_is_named():
    truth = make_truth(SyntheticConfig(n_features=48))
    W = planted(truth, SCALE)
    facts = compare(table_of(W), W, SCALE, truth, 0.2)
    assert facts["n_recovered"] == 48 and facts["distinct_latents"] == 48
    # With this scale (early snapshots amplified) every birth is above 0.2 x the normalised peak.
    assert facts["birth_definition_frac"] == 1.0
    assert facts["peak_match_frac"] == facts["emergence_match_frac"] == 1.0
    # ... but a late snapshot shrunk by its scale can fall below it: the end column then reads earlier than death - 1.
    profiles = truth.strength * SCALE.numpy()
    last = np.array([max(s for s, v in enumerate(p) if v >= 0.2 * p.max()) for p in profiles])
    assert facts["end_match_frac"] == pytest.approx((last == truth.death - 1).mean()) and facts["end_match_frac"] < 1
    assert facts["end_definition_frac"] == pytest.approx(facts["end_match_frac"])
    assert facts["peak_raw_match_frac"] == 1.0
    assert sorted(m["true_feature"] for m in facts["mismatches"]) == np.flatnonzero(last != truth.death - 1).tolist()
    # The normalised and raw truths disagree on some peaks: a raw peak compared with the table would be wrong.
    assert ((truth.strength * SCALE.numpy()).argmax(1) != truth.peak).any()

    i = int(np.flatnonzero(truth.exists.sum(1) >= 2)[0])  # move feature i's peak to another snapshot it exists at
    other = int(np.flatnonzero(truth.exists[i] & (np.arange(4) != (truth.strength[i] * SCALE.numpy()).argmax()))[0])
    W[i, other] *= 5 / W[i, other].norm() * W[i].norm(dim=-1).max()
    k = int(np.flatnonzero((truth.birth > 0) & (np.arange(48) != i))[0])  # give feature k a norm before its birth
    W[k, truth.birth[k] - 1] = 0.5 * W[k].norm(dim=-1).max() * torch.nn.functional.normalize(torch.randn(64), dim=0)
    facts = compare(table_of(W), W, SCALE, truth, 0.2)
    assert facts["n_recovered"] == 48
    assert facts["peak_match_frac"] == pytest.approx(47 / 48)
    assert facts["emergence_match_frac"] <= 47 / 48
    named = {m["true_feature"]: m for m in facts["mismatches"]}
    assert named[i]["peak_table"] == other and named[k]["emergence_table"] == truth.birth[k] - 1
    assert named[k]["emergence_truth"] == truth.birth[k]
