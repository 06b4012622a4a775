"""data.synthetic: the written data follows the stated generative model; the truth round-trips; the
recovery score is 1 for the truth itself and ~0 for noise; the CLI rejects bad keys in one line."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from data.format import iter_samples, read_manifest, sha256_file
from data.synthetic import CATEGORIES, SyntheticConfig, feature_recovery, generate, load_truth, main, make_truth, save_truth

SMALL = dict(n_snapshots=4, d_model=16, n_features=32, mean_active=3.0, n_tokens=24_000, tokens_per_sample=16,
             samples_per_shard=256, noise_std=0.3, rotation=0.2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = SyntheticConfig(**SMALL)
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    manifest = generate(cfg, out)
    acts = np.concatenate([a.astype(np.float64) for a, _, _ in iter_samples(out)])  # [N, S, D]
    tokens = np.concatenate([t for _, t, _ in iter_samples(out)])
    return cfg, out, manifest, acts, tokens


def test_dataset_reads_back_with_the_right_shapes_and_manifest(small):
    cfg, out, manifest, acts, tokens = small
    n_samples = math.ceil(cfg.n_tokens / cfg.tokens_per_sample)
    samples = list(iter_samples(out))
    assert len(samples) == n_samples == sum(e.samples for e in manifest.shards)
    a, t, meta = samples[5]
    assert a.shape == (16, 4, 16) and a.dtype == np.float16 and t.dtype == np.int32 and meta == {"doc": 5, "start": 0}
    assert (manifest.model, manifest.hook_point, manifest.dtype) == ("synthetic", "synthetic", "float16")
    assert manifest.snapshot_names == ["step0", "step1000", "step20000", "step143000"]
    assert manifest.extra["generator"] == dataclasses.asdict(cfg)
    for s, name in enumerate(manifest.snapshot_names):
        st = manifest.stats[name]
        np.testing.assert_allclose(st.mean, acts[:, s].mean(0), atol=1e-5)
        assert st.mean_norm == pytest.approx(np.linalg.norm(acts[:, s], axis=-1).mean(), rel=1e-6)
    # the last shard is the validation split; the normalisation statistics come from the others only
    assert manifest.split == {"rule": "independent_samples", "val_shards": 1} and len(manifest.shards) == 6
    n_train = sum(e.samples for e in manifest.shards[:-1]) * cfg.tokens_per_sample
    for s, name in enumerate(manifest.snapshot_names):
        st = manifest.train_stats[name]
        np.testing.assert_allclose(st.mean, acts[:n_train, s].mean(0), atol=1e-5)
        assert st.mean_norm == pytest.approx(np.linalg.norm(acts[:n_train, s], axis=-1).mean(), rel=1e-6)
        assert st.mean_norm != manifest.stats[name].mean_norm


def test_activations_follow_the_generative_model(small):
    """Mean and covariance per snapshot against the closed form of sum_i c_i strength[i,s] dir[i,s] + noise,
    with c_i ~ Bernoulli(p_i) * Exponential(1): E = sum p s d, Cov = sum (2p - p^2) s^2 d d^T + sigma^2 I."""
    cfg, out, _, acts, tokens = small
    truth = load_truth(out)
    n, S, D = acts.shape
    p = truth.frequency
    for s in range(S):
        atoms = truth.directions[:, s].astype(np.float64) * truth.strength[:, s, None]  # [F, D]
        mean = p @ atoms
        cov = (atoms.T * (2 * p - p ** 2)) @ atoms + truth.noise_std[s] ** 2 * np.eye(D)
        emp_cov = np.cov(acts[:, s].T)
        assert np.linalg.norm(acts[:, s].mean(0) - mean) < 4 * math.sqrt(np.trace(cov) / n)
        assert np.linalg.norm(emp_cov - cov) / np.linalg.norm(cov) < 0.05
        # Relative noise: sigma^2 * D = noise_std^2 * (trace of the signal covariance).
        assert truth.noise_std[s] ** 2 * D == pytest.approx(cfg.noise_std ** 2 * (np.trace(cov) - truth.noise_std[s] ** 2 * D))
    # Tokens with no firing feature carry id F and pure noise.
    silent = tokens == cfg.n_features
    assert silent.mean() == pytest.approx(np.prod(1 - p), abs=4 * math.sqrt(np.prod(1 - p) / n))
    np.testing.assert_allclose((acts[silent] ** 2).mean((0, 2)), truth.noise_std ** 2, rtol=0.06)
    # Firing counts: binomial around p * n, and every non-silent token id names a feature that fires.
    assert truth.fires.sum() > 0
    assert np.all(np.abs(truth.fires - p * n) < 5 * np.sqrt(p * n) + 1)
    assert tokens.min() >= 0 and tokens.max() <= cfg.n_features


def test_truth_has_the_stated_structure():
    cfg = SyntheticConfig()  # the default dictionary (cheap: no tokens drawn)
    t = make_truth(cfg)
    F, S, D = cfg.n_features, cfg.n_snapshots, cfg.d_model
    assert t.directions.shape == (F, S, D) and t.strength.shape == (F, S)
    np.testing.assert_allclose(np.linalg.norm(t.directions, axis=-1), 1, atol=1e-5)
    step_cos = (t.directions[:, 1:] * t.directions[:, :-1]).sum(-1)
    np.testing.assert_allclose(step_cos, math.cos(cfg.rotation), atol=1e-5)
    gram = np.abs(t.directions[:, 0] @ t.directions[:, 0].T)[~np.eye(F, dtype=bool)]
    assert 0.2 < gram.max() < 0.7  # nearly, not exactly, orthogonal
    s = np.arange(S)
    for i in range(F):
        window = (s >= t.birth[i]) & (s < t.death[i])
        np.testing.assert_array_equal(t.exists[i], window)
        assert t.strength[i, t.peak[i]] == 1 and window[t.peak[i]]
        off = window & (s != t.peak[i])
        assert np.all((t.strength[i, off] >= cfg.min_strength) & (t.strength[i, off] <= cfg.max_off_peak))
        assert np.all(np.diff(t.strength[i, t.birth[i]:t.peak[i] + 1]) > 0)
        assert np.all(np.diff(t.strength[i, t.peak[i]:t.death[i]]) < 0)
    cat = t.category
    assert [int((cat == k).sum()) for k in range(3)] == [64, 128, 64]
    assert np.all(t.birth[cat == 0] == 0)
    assert np.all((t.birth[cat == 1] > 0) & (t.death[cat == 1] == S))
    assert np.all((t.birth[cat == 2] > 0) & (t.death[cat == 2] < S))
    assert t.frequency.sum() == pytest.approx(cfg.mean_active)
    assert t.frequency.min() * cfg.n_tokens > 3000  # the rarest feature fires thousands of times
    assert len(set(np.round(t.peak))) == S  # peaks spread over every snapshot


def test_truth_round_trips(tmp_path, small):
    cfg, out, *_ = small
    t = make_truth(dataclasses.replace(cfg, seed=7))
    t.fires[:] = np.arange(cfg.n_features)
    save_truth(tmp_path, t)
    back = load_truth(tmp_path)
    assert back.config == t.config
    for f in dataclasses.fields(t):
        if f.name != "config":
            a, b = getattr(t, f.name), getattr(back, f.name)
            assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    written = load_truth(out)  # the dataset's truth is the seed's dictionary plus the firing counts
    fresh = make_truth(cfg)
    assert np.array_equal(written.directions, fresh.directions) and np.array_equal(written.strength, fresh.strength)
    with pytest.raises(FileNotFoundError, match="truth.safetensors"):
        load_truth(tmp_path / "nowhere")


def test_same_seed_same_bytes(tmp_path):
    cfg = SyntheticConfig(**{**SMALL, "n_tokens": 3000, "samples_per_shard": 64})
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        m = generate(dataclasses.replace(cfg, seed=seed), tmp_path / name)
        digests.append([e.sha256 for e in m.shards] + [sha256_file(tmp_path / name / "truth.safetensors")])
        assert [e.sha256 for e in m.shards] == [sha256_file(tmp_path / name / e.file) for e in m.shards]
    assert len(digests[0]) == 4  # 188 samples -> shards of 64, 64, 60, plus the truth
    assert digests[0] == digests[1] and not set(digests[0]) & set(digests[2])
    with pytest.raises(ValueError, match="not empty"):
        generate(cfg, tmp_path / "a")


def decoder_from_truth(truth, scale: torch.Tensor, n_extra: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The true atoms in normalised units (times scale[s]), each latent rescaled by a random positive
    factor, shuffled among random extra latents. Returns (W_dec [F, S, D], position of true feature i)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.from_numpy(truth.atoms()) * scale[None, :, None]
    atoms = atoms * torch.empty(len(atoms), 1, 1).uniform_(0.1, 10, generator=g)
    W = torch.cat([atoms, torch.randn(n_extra, *atoms.shape[1:], generator=g)])
    perm = torch.randperm(len(W), generator=g)
    return W[perm], perm.argsort()[: len(atoms)]


def first_present(profile: np.ndarray, fraction: float = 0.2) -> int:
    """Reference for the table's emergence: the first s with profile[s] >= fraction * max (a plain loop)."""
    top = max(profile)
    return next(s for s, v in enumerate(profile) if v >= fraction * top)


def test_recovery_is_perfect_for_the_truth_and_nil_for_noise():
    truth = make_truth(SyntheticConfig(n_features=64))
    scale = torch.tensor([9.0, 3.0, 1.0, 0.5])
    W, where = decoder_from_truth(truth, scale)
    r = feature_recovery(W, truth, scale)
    assert r["recovered_frac"] == 1.0 and r["peak_correct_frac"] == 1.0 and r["peak_correct_frac_raw"] == 1.0
    assert torch.equal(r["match"], where) and torch.allclose(r["best_cos"], torch.ones(64))
    assert all(r[f"recovered_frac_{c}"] == 1.0 for c in CATEGORIES) and torch.all(r["n_matches"] == 1)
    # The true peak in normalised units is argmax_s strength * scale: here often not truth.peak (raw units).
    normalised_peak = (truth.strength * scale.numpy()).argmax(1)
    np.testing.assert_array_equal(r["peak_true"], normalised_peak)
    assert (normalised_peak != truth.peak).mean() > 0.3
    # The same decoder read as if it were in raw units (scale=None) puts the raw truth's peak elsewhere.
    unscaled = feature_recovery(W, truth, None)
    np.testing.assert_array_equal(unscaled["peak_learned"], normalised_peak)
    np.testing.assert_array_equal(unscaled["peak_true"], truth.peak)
    assert unscaled["peak_correct_frac"] == pytest.approx((normalised_peak == truth.peak).mean())
    # A decoder in raw units (scale=None) is judged against the raw truth: all right.
    raw = feature_recovery(torch.from_numpy(truth.atoms()), truth, None)
    assert raw["peak_correct_frac"] == raw["birth_correct_frac"] == 1.0
    noise = feature_recovery(torch.randn(1024, 4, 64, generator=torch.Generator().manual_seed(1)), truth, scale)
    assert noise["recovered_frac"] == 0.0 and math.isnan(noise["peak_correct_frac"])
    assert math.isnan(noise["birth_correct_frac"]) and noise["best_cos"].max() < 0.6


def test_birth_uses_the_tables_emergence_definition():
    """A scale that shrinks early snapshots makes some births weaker than 0.2 x the normalised peak: the table's
    definition then dates them later, for the truth's own decoder too; birth_definition_frac says how many."""
    truth = make_truth(SyntheticConfig(n_features=64))
    scale = torch.tensor([0.5, 1.0, 3.0, 9.0])
    W, where = decoder_from_truth(truth, scale)
    r = feature_recovery(W, truth, scale)
    profiles = truth.strength.astype(np.float64) * scale.numpy()
    reference = np.array([first_present(p) for p in profiles])
    np.testing.assert_array_equal(r["birth_learned"], reference)
    ceiling = (reference == truth.birth).mean()
    assert 0.5 < ceiling < 1.0
    assert r["birth_correct_frac"] == pytest.approx(ceiling) and r["birth_definition_frac"] == pytest.approx(ceiling)
    # A stricter fraction dates more births late.
    strict = feature_recovery(W, truth, scale, emergence_fraction=0.5)
    assert strict["birth_correct_frac"] == pytest.approx(np.mean([first_present(p, 0.5) == b
                                                                   for p, b in zip(profiles, truth.birth)]))
    assert strict["birth_correct_frac"] < ceiling


def test_recovery_catches_a_wrong_peak_a_wrong_birth_and_ignores_absent_snapshots():
    truth = make_truth(SyntheticConfig(n_features=64))
    scale = torch.ones(4)
    W, where = decoder_from_truth(truth, scale)
    i = int(np.flatnonzero(truth.exists.sum(1) >= 2)[0])  # a feature with an off-peak snapshot to move the peak to
    other = int(np.flatnonzero(truth.exists[i] & (np.arange(4) != truth.peak[i]))[0])
    W[where[i], other] *= 3 / truth.strength[i, other]  # now 3x the peak's norm
    j = int(np.flatnonzero(~truth.exists.all(1))[0])  # a feature absent somewhere: garbage there is not scored
    absent = int(np.flatnonzero(~truth.exists[j])[0])
    W[where[j], absent] = torch.randn(64) * 1e-3
    k = int(np.flatnonzero((truth.birth > 0) & (np.arange(64) != i) & (np.arange(64) != j))[0])
    W[where[k], truth.birth[k] - 1] = W[where[k]].norm(dim=-1).max() * 0.5 * torch.nn.functional.normalize(
        torch.randn(64), dim=0)  # a strong norm before birth: the cosine skips it, the emergence column does not
    r = feature_recovery(W, truth, scale)
    assert r["recovered_frac"] == 1.0 and r["best_cos"][j] > 0.999 and r["best_cos"][k] > 0.999
    assert r["peak_learned"][i] == other and not r["peak_correct"][i]
    assert r["peak_correct_frac"] == r["peak_correct_frac_raw"] == pytest.approx(63 / 64)
    assert r["birth_learned"][j] == truth.birth[j] and r["birth_learned"][k] == truth.birth[k] - 1
    assert not r["birth_correct"][k] and r["birth_correct_frac"] == pytest.approx(63 / 64)
    with pytest.raises(ValueError, match="W_dec has shape"):
        feature_recovery(W[:, :3], truth, scale)


def test_cli_writes_a_dataset_and_rejects_bad_keys(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [f"out={out}", "n_tokens=640", "tokens_per_sample=32", "d_model=8", "n_features=16", "mean_active=2",
            "samples_per_shard=10"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "640 tokens" in printed and "16 true features" in printed
    assert read_manifest(out).n_tokens == 640 and load_truth(out).config.d_model == 8
    assert read_manifest(out).recorded_val_shards == 1  # 2 shards: the second is the validation split
    one_shard = ["n_tokens=640", "tokens_per_sample=32"]  # 20 samples in one shard of 512: nothing left to train on
    for bad, named in ((["bogus=1"], "unknown key 'bogus'"), (["n_tokens=abc"], "n_tokens"),
                       (["frac_initial=0.9"], "frac_initial + frac_emergent + frac_transient"), ([], "out=<dir>"),
                       (one_shard, "val_shards=1 needs 1 <= val_shards < shards; n_tokens=640 makes 1 shard(s)")):
        argv = ([f"out={tmp_path / 'x'}"] if bad else []) + bad
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err
    assert not (tmp_path / "x").exists()
