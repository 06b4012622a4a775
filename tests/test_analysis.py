"""analyze.py on a run: each table column, the activation pass and the summary against hand computations
on small crosscoders with planted decoders; the figures, the report and TensorBoard images end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from analysis import evolution, summary
from analysis.activations import LATENT_VIEW, activation_pass
from analysis.run_files import load_run, parse_loss_curve
from crosscoder.model import Crosscoder
from data.format import DatasetWriter, Snapshot, iter_samples, read_manifest
from tests.conftest import ROOT

NAMES = ["step0", "step10", "step100", "step1000"]
STEPS = [0, 10, 100, 1000]


def planted_decoder(D: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """W_dec [8, 4, D] with known norm profiles on orthogonal directions (profiles [8, 4] returned too).
    Feature 1 turns by 60 degrees between the last two snapshots."""
    profiles = np.array([
        [1.0, 1.0, 1.0, 1.0],  # 0 persistent
        [0.0, 0.1, 1.0, 0.8],  # 1 emergent at 2 (0.1 < 0.2 of max), turns by 60 degrees at 3
        [0.0, 1.0, 0.5, 0.05],  # 2 transient 1..2
        [1.0, 0.3, 0.0, 0.0],  # 3 initial 0..1
        [0.5, 0.5, 0.5, 0.5],  # 4 never fires: dead
        [0.0, 1.0, 0.0, 1.0],  # 5 emergent with a gap: lifetime 3, persistence 2/3
        [0.2, 0.19, 1.0, 1.0],  # 6 exactly at the 0.2 threshold at 0: persistent, absent at 1
        [0.0, 0.0, 0.0, 0.0],  # 7 zero decoder: dead
    ])
    eye = torch.eye(D, dtype=torch.float64)
    W = torch.zeros(8, 4, D, dtype=torch.float64)
    for i in range(8):
        for s in range(4):
            W[i, s] = profiles[i, s] * eye[i]
    W[1, 3] = 0.8 * (math.cos(math.pi / 3) * eye[1] + math.sin(math.pi / 3) * eye[9])
    return W.float(), profiles


def test_feature_table_columns_by_hand():
    W, _ = planted_decoder()
    fired = np.array([0.5, 0.4, 0.3, 0.2, 0.0, 0.1, 0.6, 0.05])
    active = np.tile(fired[:, None], (1, 4)) * 0.5
    t = evolution.feature_table(W, NAMES, STEPS, 0.2, fired=fired, active=active)
    assert list(t.category) == ["persistent", "emergent", "transient", "initial", "dead", "emergent", "persistent",
                                "dead"]
    assert t.emergence_index.tolist()[:7] == [0, 2, 1, 0, 0, 1, 0] and pd.isna(t.emergence_index[7])
    assert t.emergence_step.tolist()[:7] == [0, 100, 10, 0, 0, 10, 0]
    assert t.end_index.tolist()[:7] == [3, 3, 2, 1, 3, 3, 3]
    assert t.end_step.tolist()[:7] == [1000, 1000, 100, 10, 1000, 1000, 1000]
    assert t.lifetime.tolist()[:7] == [4, 2, 2, 2, 4, 3, 4] and pd.isna(t.lifetime[7])
    # persistence: share of the snapshots from emergence to the last where the feature is present
    np.testing.assert_allclose(t.persistence[:7], [1, 1, 2 / 3, 2 / 4, 1, 2 / 3, 3 / 4])
    assert t.peak_index.tolist()[:4] == [0, 2, 1, 0] and t.peak_step[1] == 100
    np.testing.assert_allclose(t.max_norm, [1, 1, 1, 1, 0.5, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(t.norm_change, [0, 1, 1, 1, 0, 1, 0.81, 0], atol=1e-6)
    np.testing.assert_allclose(t["norm_step100"], [1, 1, 0.5, 0, 0.5, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(t.freq, fired)
    np.testing.assert_allclose(t["freq_step10"], active[:, 1])
    # consecutive cosines: 1 along a fixed direction, 0.5 for the 60-degree turn, NaN next to a zero vector
    assert t["cos_prev_step1000"][1] == pytest.approx(0.5, abs=1e-6)
    assert t["cos_prev_step100"][1] == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(t["cos_prev_step10"][1]) and np.isnan(t["cos_prev_step100"][3])
    assert t["cos_prev_step10"][0] == pytest.approx(1.0)
    assert "cos_prev_step0" not in t
    # without an activation pass only a zero decoder is dead, and frequency columns are NaN
    t2 = evolution.feature_table(W, NAMES, STEPS, 0.2)
    assert t2.category[4] == "persistent" and t2.category[7] == "dead" and t2.freq.isna().all()
    # the fraction is a parameter: at 0.1 feature 1 emerges at snapshot 1
    assert evolution.feature_table(W, NAMES, STEPS, 0.1).emergence_index[1] == 1


def test_projection_matrix_by_hand():
    rng = np.random.default_rng(0)
    W = torch.from_numpy(rng.standard_normal((5, 3, 6))).float()
    present = rng.random((5, 3)) > 0.3
    mean, count = evolution.projection_matrix(W, present, chunk=2)
    for i in range(3):
        for j in range(3):
            cos = [float(W[f, i] @ W[f, j] / (W[f, i].norm() * W[f, j].norm()))
                   for f in range(5) if present[f, i] and present[f, j]]
            assert count[i, j] == len(cos)
            if cos:
                assert mean[i, j] == pytest.approx(np.mean(cos), abs=1e-6)
            else:
                assert np.isnan(mean[i, j])


def test_emerged_fraction_and_turning_point_by_hand():
    t = pd.DataFrame({"category": ["dead", "initial", "emergent", "emergent", "transient"],
                      "emergence_index": pd.array([0, 0, 2, 3, 2], dtype="Int64")})
    frac = summary.emerged_fraction(t, 4)
    np.testing.assert_allclose(frac, [0.25, 0.25, 0.75, 1.0])
    assert summary.turning_point(frac, STEPS) == 100


def test_parse_loss_curve_formats():
    want = ([0, 10, 20], [5.0, 4.0, 3.0])
    assert parse_loss_curve({"steps": [0, 10, 20], "loss": [5, 4, 3]}) == want
    assert parse_loss_curve([{"step": 20, "loss": 3}, {"step": 0, "loss": 5}, {"step": 10, "loss": 4}]) == want
    assert parse_loss_curve({"0": 5, "10": 4, "20": 3}) == want
    assert parse_loss_curve({"train": {"step": [0, 10, 20], "train_loss": [5, 4, 3]}}) == want
    assert parse_loss_curve({"nothing": 1}) is None


# ---- a run folder with a planted crosscoder and a tiny dataset ------------------------------------------
def write_run(tmp_path: Path, model: Crosscoder, data: Path, metrics: dict | None = None,
              suite: Path | None = None, val_shards: int = 1) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    model.save(run)
    cfg = {"data": {"path": str(data), "val_shards": val_shards, "snapshots": None}}
    if suite is not None:
        cfg["model"] = {"repo": str(suite)}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def small_run(tmp_path):
    """S=4, D=16, F=8 planted decoder; encoder reads direction e_i from every snapshot; 3 shards x 4
    windows of 8 tokens (the last shard held out); scale differs per snapshot."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    W, _ = planted_decoder()
    model = Crosscoder(4, 16, 8, snapshot_names=NAMES)
    with torch.no_grad():
        model.W_dec.copy_(W)
        model.W_enc.copy_(torch.eye(16)[:, :8].expand(4, 16, 8) / 4 + 0.05 * torch.randn(4, 16, 8))
        model.b_enc.copy_(torch.tensor([0.0, 0.1, -0.1, 0.0, -1e3, 0.0, 0.05, 0.0]))
        model.b_dec.copy_(0.1 * torch.randn(4, 16))
        model.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 1.5]))
    data = tmp_path / "data"
    with DatasetWriter(data, model="toy", hook_point="x", snapshots=[Snapshot(n, s) for n, s in zip(NAMES, STEPS)],
                       d_model=16, tokens_per_sample=8, dtype="float32", samples_per_shard=4) as w:
        for k in range(12):
            w.write(rng.standard_normal((8, 4, 16)).astype(np.float32), np.arange(8 * k, 8 * k + 8, dtype=np.int32),
                    doc=k, start=0)
    return write_run(tmp_path, model, data), model, data


def hand_pass(model: Crosscoder, data: Path, tau: float):
    """Float64 numpy reimplementation: windows in the analysis order (held-out shard first)."""
    m = read_manifest(data)
    order = [m.shards[-1]] + m.shards[:-1]
    acts = np.concatenate([a for e in order for a, _, _ in iter_samples(data, m, shards=[e])]).astype(np.float64)
    held = np.zeros(len(acts), bool)
    held[:m.shards[-1].tokens] = True
    x = acts * model.scale.double().numpy()[None, :, None]
    W_enc, W_dec = model.W_enc.detach().double().numpy(), model.W_dec.detach().double().numpy()
    f = np.maximum(np.einsum("bsd,sdf->bf", x, W_enc) + model.b_enc.detach().double().numpy(), 0)
    recon = np.einsum("bf,fsd->bsd", f, W_dec) + model.b_dec.detach().double().numpy()
    norms = np.linalg.norm(W_dec, axis=-1)  # [F, S]
    act = f[:, :, None] * norms[None] > tau * math.sqrt(16)  # [B, F, S]
    xh, rh = x[held], recon[held]
    ev = 1 - ((xh - rh) ** 2).sum((0, 2)) / ((xh - xh.mean(0)) ** 2).sum((0, 2))
    return dict(x=x, f=f, fired=(f > 0).mean(0), active=act.mean(0), ev=ev, l0=(f[held] > 0).sum(1).mean(),
                l0_s=act[held].sum(1).mean(0), enc=np.einsum("bsd,sdf->bsf", x, W_enc))


def test_activation_pass_by_hand(small_run):
    run, model, data = small_run
    want = hand_pass(model, data, tau=0.01)
    stats = activation_pass(model, data, read_manifest(data), val_shards=1, max_tokens=10_000, batch_size=20,
                            active_threshold=0.01, view_snapshots=[0, 3], n_contexts=3)
    assert stats.tokens == 96 and stats.eval_tokens == 32 and stats.eval_held_out
    np.testing.assert_allclose(stats.fired, want["fired"], atol=1e-9)
    np.testing.assert_allclose(stats.active, want["active"], atol=1e-9)
    assert stats.fired[4] == 0 and (stats.active[7] == 0).all()
    np.testing.assert_allclose(stats.explained_variance, want["ev"], rtol=1e-5)
    assert stats.l0 == pytest.approx(want["l0"])
    np.testing.assert_allclose(stats.l0_per_snapshot, want["l0_s"])
    # top contexts: global token index in reading order, largest first
    for i in (0, 1, 5):
        np.testing.assert_array_equal(stats.top[LATENT_VIEW].index[:, i], np.argsort(-want["f"][:, i])[:3])
        np.testing.assert_array_equal(stats.top["step1000"].index[:, i], np.argsort(-want["enc"][:, 3, i])[:3])
        assert stats.top["step0"].values[0, i] == pytest.approx(want["enc"][:, 0, i].max(), rel=1e-5)
    assert stats.token_ids[0, 0] == 64  # the held-out shard (windows 8..11) is read first
    # max_tokens stops at whole windows
    few = activation_pass(model, data, read_manifest(data), 1, 20, 8, 0.01, [], 2)
    assert few.tokens == 16 and few.token_ids.shape == (2, 8)


def test_summary_uses_metrics_json_when_it_has_per_snapshot_values(small_run):
    run, model, data = small_run
    stats = activation_pass(model, data, read_manifest(data), 1, 10_000, 32, 0.01, [], 2)
    t = evolution.feature_table(model.W_dec, NAMES, STEPS, 0.2, stats.fired, stats.active)
    proj = evolution.projection_matrix(model.W_dec, evolution.presence(evolution.norm_matrix(t, NAMES), 0.2))
    common = dict(run_dir="r", names=NAMES, steps=STEPS, table=t, stats=stats, projection=proj, d_model=16,
                  activation="relu", emergence_fraction=0.2, active_threshold=0.01)
    metrics = {"val/explained_variance": 0.5, **{f"val/explained_variance/{n}": 0.1 * i for i, n in enumerate(NAMES)}}
    s = summary.build_summary(metrics=metrics, **common)
    assert s["explained_variance"]["source"] == "metrics.json" and s["explained_variance"]["per_snapshot"]["step100"] == 0.2
    assert s["explained_variance"]["activation_pass"]["step100"] == pytest.approx(float(stats.explained_variance[2]))
    s2 = summary.build_summary(metrics={}, **common)
    assert s2["explained_variance"]["source"] == "activation pass"
    assert s2["l0"]["per_snapshot"]["step10"] == pytest.approx(float(stats.l0_per_snapshot[1]))
    assert s2["categories"] == {c: int((t.category == c).sum()) for c in evolution.CATEGORIES}
    assert s2["dead_fraction"]["per_snapshot"]["step0"] == pytest.approx(float((stats.active[:, 0] == 0).mean()))
    json.dumps(s2, allow_nan=False)  # NaN (empty projection cells) became null


# ---- the synthetic dataset: emergence and lifetime against the generator's truth ----------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from data.synthetic import SyntheticConfig, generate, load_truth
    out = tmp_path_factory.mktemp("synthetic") / "data"
    cfg = SyntheticConfig(n_snapshots=6, d_model=32, n_features=96, mean_active=4, n_tokens=4096,
                          tokens_per_sample=32, samples_per_shard=32, noise_std=0.05, seed=3)
    generate(cfg, out)
    return out, load_truth(out)


def recovered_crosscoder(data: Path, truth, noise: float = 0.02, extra: int = 32, seed: int = 0) -> Crosscoder:
    """What a well-trained crosscoder would hold: the true atoms in normalised units (x scale), shuffled,
    with decoder noise, plus junk latents; encoder = decoder directions (what fires is realistic)."""
    m = read_manifest(data)
    S, D, F_true = len(m.snapshots), m.d_model, truth.strength.shape[0]
    scale = torch.tensor([math.sqrt(D) / m.stats[s.name].mean_norm for s in m.snapshots])
    g = torch.Generator().manual_seed(seed)
    atoms = torch.from_numpy(truth.atoms()) * scale[None, :, None]
    W = torch.cat([atoms + noise * torch.randn(atoms.shape, generator=g) * atoms.norm(dim=-1, keepdim=True),
                   0.3 * torch.randn(extra, S, D, generator=g)])[torch.randperm(F_true + extra, generator=g)]
    model = Crosscoder(S, D, F_true + extra, snapshot_names=m.snapshot_names)
    with torch.no_grad():
        model.W_dec.copy_(W)
        unit = W / W.norm(dim=-1, keepdim=True).pow(2).sum(1, keepdim=True).clamp(min=1e-12)
        model.W_enc.copy_(unit.permute(1, 2, 0))
        model.b_enc.fill_(-0.2)
        model.scale.copy_(scale)
    return model


def test_emergence_and_lifetime_match_synthetic_truth(synthetic):
    from data.synthetic import feature_recovery
    data, truth = synthetic
    model = recovered_crosscoder(data, truth)
    names = model.snapshot_names
    steps = [s.step for s in read_manifest(data).snapshots]
    t = evolution.feature_table(model.W_dec, names, steps, 0.2)
    rec = feature_recovery(model.W_dec, truth, scale=model.scale)
    match, ok = rec["match"].numpy(), rec["recovered"].numpy()
    assert ok.mean() > 0.9
    row = t.iloc[match[ok]]
    emergence_ok = row.emergence_index.to_numpy(dtype=int) == truth.birth[ok]
    lifetime_ok = row.lifetime.to_numpy(dtype=int) == (truth.death - truth.birth)[ok]
    end_ok = row.end_index.to_numpy(dtype=int) == truth.death[ok] - 1
    assert emergence_ok.mean() >= 0.9 and lifetime_ok.mean() >= 0.9 and end_ok.mean() >= 0.9
    # categories follow the generator's: initial -> persistent/initial (by whether it dies), emergent, transient
    cat = np.array(["initial", "emergent", "transient"])[truth.category[ok]]
    want = np.where(cat == "initial", np.where(truth.death[ok] == len(names), "persistent", "initial"), cat)
    assert (row.category.to_numpy() == want).mean() >= 0.9


# ---- end to end through Hydra's compose API ------------------------------------------------------------
def compose_analyze(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import analyze  # noqa: F401  (registers the schema)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("analyze", overrides=overrides)


def write_suite(folder: Path, vocab: int) -> Path:
    """A model-suite folder as the mini-Pythia helper leaves it: tokenizer.json and loss_curve.json."""
    from tokenizers import Tokenizer, models
    folder.mkdir()
    Tokenizer(models.WordLevel({f"tok{i}": i for i in range(vocab)}, unk_token="tok0")).save(str(folder / "tokenizer.json"))
    steps = list(range(0, 3001, 100))
    (folder / "loss_curve.json").write_text(json.dumps({"steps": steps, "loss": [3 + 2 / (1 + math.exp((s - 1500) / 200))
                                                                                  for s in steps]}))
    return folder


def image_is_drawn(path: Path) -> bool:
    import matplotlib.pyplot as plt
    img = plt.imread(path)
    return path.stat().st_size > 15_000 and img.shape[0] > 300 and img[..., :3].std() > 0.05


def test_analyze_run_end_to_end(synthetic, tmp_path):
    from analyze import analyze_run
    data, truth = synthetic
    model = recovered_crosscoder(data, truth)
    F = model.d_sae
    suite = write_suite(tmp_path / "suite", vocab=truth.strength.shape[0] + 1)
    run = write_run(tmp_path, model, data, suite=suite, val_shards=1,
                    metrics={"val/explained_variance": 0.9, "val/l0": 4.0, "val/dead_fraction": 0.0, "d_sae": F})
    cfg = compose_analyze([f"run={run}", "n_browser_features=6", "n_contexts=3", "batch_size=512"])
    out = analyze_run(cfg)
    assert out == run / "analysis"

    table = pd.read_parquet(out / "features.parquet")
    csv = pd.read_csv(out / "features.csv")
    assert list(table.columns) == list(csv.columns) and len(table) == F
    np.testing.assert_allclose(table.max_norm, csv.max_norm)
    np.testing.assert_allclose(table[[f"norm_{n}" for n in model.snapshot_names]].to_numpy(),
                               model.decoder_norms().detach().numpy(), rtol=1e-5)

    # the dataset holds the synthetic truth, so the table is checked against it (analysis/synthetic_check.py)
    check = json.loads((out / "synthetic_check.json").read_text())
    rec = feature_recovery_result(model, truth)
    ok, m = rec["recovered"].numpy(), rec["match"].numpy()[rec["recovered"].numpy()]
    want_peak = (truth.strength * model.scale.numpy()).argmax(1)[ok]  # the true peak in normalised units
    assert check["n_recovered"] == ok.sum() and check["recovered_frac"] > 0.9
    assert check["peak_match_frac"] == pytest.approx((table.peak_index.to_numpy()[m] == want_peak).mean())
    assert check["emergence_match_frac"] == pytest.approx(
        (table.emergence_index.to_numpy(dtype=int)[m] == truth.birth[ok]).mean())
    assert check["peak_match_frac"] > 0.9 and check["emergence_match_frac"] > 0.9

    s = json.loads((out / "summary.json").read_text())
    assert sum(s["categories"].values()) == F and s["tokens"]["analysed"] == 4096
    assert s["explained_variance"]["source"] == "activation pass"  # metrics.json had no per-snapshot EV
    assert s["loss_curve"]["steps"][-1] == 3000 and s["turning_point_step"] in [x["step"] for x in s["snapshots"]]
    assert len(s["projection"]["mean"]) == model.n_snapshots

    pngs = sorted(out.glob("fig*.png"))
    assert [p.stem for p in pngs] == ["fig1_decoder_norms", "fig2_emergence_lifetime", "fig3_projection",
                                      "fig4_ev_l0", "fig6_turning_point"]
    for p in pngs:
        assert image_is_drawn(p), p

    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 5 and page.count("src=") == 5
    assert page.count('class="feature"') == 6 and 'class="hl"' in page

    # the browser decodes with the suite's tokenizer; synthetic token ids name the strongest true feature,
    # so a planted latent's top token is mostly its own true feature
    browser = json.loads((out / "browser.json").read_text())
    assert len(browser) == 6 and all(len(e["views"]) == 5 for e in browser)
    inverse = {int(latent): i for i, latent in enumerate(feature_recovery_match(model, truth))}
    hits = [e["views"][0]["contexts"][0]["tokens"][e["views"][0]["contexts"][0]["highlight"]]
            == f"tok{inverse[e['feature']]}" for e in browser if e["feature"] in inverse]
    assert hits and np.mean(hits) >= 0.5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(f"analysis/{p.stem}" for p in pngs)


def feature_recovery_result(model: Crosscoder, truth) -> dict:
    from data.synthetic import feature_recovery
    return feature_recovery(model.W_dec, truth, scale=model.scale)


def feature_recovery_match(model: Crosscoder, truth) -> np.ndarray:
    return feature_recovery_result(model, truth)["match"].numpy()


def test_run_without_dataset_uses_decoders_only(small_run, tmp_path):
    from analyze import analyze_run
    run, model, data = small_run
    cfg_path = run / "config.yaml"
    OmegaConf.save(OmegaConf.create({"data": {"path": str(tmp_path / "moved")}}), cfg_path)
    with pytest.warns(UserWarning, match="data.path unreadable"):
        out = analyze_run(compose_analyze([f"run={run}", f"out={tmp_path / 'a'}", "tensorboard=false"]))
        assert load_run(run).steps == STEPS  # parsed from the names when the manifest is gone
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens"] is None and s["categories"]["dead"] == 1  # only the zero decoder
    assert json.loads((out / "browser.json").read_text()) == []
    assert not (out / "synthetic_check.json").exists()  # no dataset, no truth to check against


def test_held_out_shards_follow_the_datasets_recorded_split(small_run, tmp_path):
    """data.val_shards: null (the default) analyses the split the dataset records, else 1 shard; an explicit value
    that contradicts the recorded split warns and the recorded split wins (as training refuses it)."""
    run, model, data = small_run
    cfg_path = run / "config.yaml"
    OmegaConf.save(OmegaConf.create({"data": {"path": str(data), "val_shards": None}}), cfg_path)
    assert load_run(run).val_shards == 1  # no recorded split
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["split"] = {"val_shards": 2, "rule": "test"}
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert load_run(run).val_shards == 2
    OmegaConf.save(OmegaConf.create({"data": {"path": str(data), "val_shards": 1}}), cfg_path)
    with pytest.warns(UserWarning, match="holds out its last 2 shard"):
        assert load_run(run).val_shards == 2
