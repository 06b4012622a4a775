"""The paper's crosscoder (crosscoder=paper) against float64 hand computations, and its presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosscoder.model import Crosscoder
from tests.conftest import compose_train

# the paper's 32 steps written out here on purpose: an independent check of conf/model/_pythia_revisions.yaml
PAPER_STEPS = [0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000,
               14000, 20000, 27000, 34000, 47000, 60000, 74000, 87000, 100000, 114000, 127000, 143000]


def paper_model(S=3, D=6, F=20, bandwidth=0.5, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    model = Crosscoder(S, D, F, activation="paper", jumprelu_init_threshold=0.1, jumprelu_bandwidth=bandwidth,
                       dec_init_norm=0.5)
    with torch.no_grad():  # snapshots with different decoder norms, so gates differ between snapshots
        model.W_dec.mul_(torch.rand(F, S, 1) * 1.5 + 0.1)
        model.b_enc.normal_(0, 0.2)
        model.log_threshold.normal_(np.log(0.1), 0.5)
    return model


def test_forward_and_tanh_quad_penalty_match_float64():
    model = paper_model()
    x = np.random.default_rng(0).standard_normal((40, 3, 6))
    out = model(torch.tensor(x, dtype=torch.float32))
    terms = model.loss_terms(torch.tensor(x, dtype=torch.float32), out)

    W_enc, W_dec = model.W_enc.detach().double().numpy(), model.W_dec.detach().double().numpy()
    t = np.exp(model.log_threshold.detach().double().numpy())
    pre = np.einsum("bsd,sdf->bf", x, W_enc) + model.b_enc.detach().double().numpy()
    norms = np.linalg.norm(W_dec, axis=-1)  # [F, S]
    f = pre[:, None, :] * (pre[:, None, :] * norms.T[None] > t)  # [B, S, F]: one gate per snapshot
    recon = np.einsum("bsf,fsd->bsd", f, W_dec) + model.b_dec.detach().double().numpy()
    p = np.tanh(4.0 * f * norms.T[None]).mean(axis=(0, 1))
    penalty = (p * (1 + p / 0.01)).sum()

    codes = torch.stack([out.snapshot_code(s) for s in range(3)], 1)
    np.testing.assert_allclose(codes.numpy(), f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.recon.detach().numpy(), recon, rtol=1e-4, atol=1e-4)
    assert terms.sparsity.item() == pytest.approx(penalty, rel=1e-4)
    assert terms.mse.item() == pytest.approx(((x - recon) ** 2).sum(axis=(1, 2)).mean(), rel=1e-4)
    # the point of per-snapshot gates: some latent is on at one snapshot and off at another
    on = f != 0
    assert (on.any(1) & ~on.all(1)).any()


def test_thresholds_get_their_own_learning_rate(toy_dataset, tmp_path):
    from hydra.utils import instantiate
    cfg = compose_train([f"data.path={toy_dataset}", "crosscoder=paper", "crosscoder.lr=2e-4"], tmp_path)
    import lightning as L
    module = instantiate(cfg.crosscoder, n_snapshots=3, d_model=16)
    module.trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False)
    opt = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [2e-4, pytest.approx(2e-5)]
    assert opt.param_groups[1]["params"][0] is module.crosscoder.log_threshold


@pytest.mark.parametrize("preset,layer,d_sae,lr,threshold_factor,model", [
    ("paper_pythia160m", 6, 98304, 5e-5, 0.1, "EleutherAI/pythia-160m"),
    ("paper_pythia6.9b", 16, 32768, 1e-5, 0.3, "EleutherAI/pythia-6.9b")])
def test_paper_presets_match_the_method(tmp_path, preset, layer, d_sae, lr, threshold_factor, model):
    cfg = compose_train([f"experiment={preset}"], tmp_path)
    assert cfg.model.repo == model and list(cfg.model.revisions) == [f"step{s}" for s in PAPER_STEPS]
    assert (cfg.model.layer, cfg.model.hook, cfg.model.context_length) == (layer, "resid_post", 2048)
    assert cfg.cache.drop_first == 1 and cfg.cache.n_tokens == 800_000_000 and cfg.cache.dtype == "float16"
    assert cfg.corpus.source == "cerebras/SlimPajama-627B"
    cc = cfg.crosscoder
    assert (cc.activation, cc.d_sae, cc.lr, cc.threshold_lr_factor) == ("paper", d_sae, lr, threshold_factor)
    assert (cc.jumprelu_init_threshold, cc.l1_coef, cc.l1_warmup_steps, cc.tanh_c, cc.tanh_s) == (0.1, 0.3, 0.1, 4.0, 0.01)
    assert (cc.optimizer, list(cc.betas), cc.lr_warmup_steps) == ("adam", [0.9, 0.999], 5000)
    assert (cc.lr_decay_start, cc.lr_final_factor) == (0.8, 1 / 32)  # decay to lr/32 over the last 20%
    from data.snapshots import check_revisions
    check_revisions(cfg.model.repo, list(cfg.model.revisions))


def test_paper_preset_trains(toy_dataset, tmp_path):
    from train import train
    cfg = compose_train([f"data.path={toy_dataset}", "crosscoder=paper", "crosscoder.d_sae=48", "data.batch_size=64",
                         "data.shuffle_buffer=256", "trainer.max_steps=150", "trainer.val_check_interval=75",
                         "crosscoder.lr=3e-3", "crosscoder.l1_coef=0.03", "callbacks.progress_bar.refresh_rate=0",
                         "logger=none"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["val/explained_variance"] > 0.85 and 0 < metrics["val/l0"] < 24
    loaded = Crosscoder.load(tmp_path / "run")
    assert loaded.activation == "paper" and loaded.log_threshold.shape == (48,)


def test_paper_tiny_applies_the_recipe_to_the_offline_suite(tmp_path):
    cfg = compose_train(["experiment=paper_tiny"], tmp_path)
    assert cfg.model.name == "tiny" and cfg.model.build is not None  # built offline, no hub access
    cc = cfg.crosscoder
    assert (cc.activation, cc.jumprelu_init_threshold, cc.l1_coef, cc.tanh_c, cc.tanh_s) == ("paper", 0.1, 0.3, 4.0, 0.01)
    assert (cc.l1_warmup_steps, cc.lr_decay_start, cc.lr_final_factor) == (0.1, 0.8, 1 / 32)
    assert cc.d_sae == 1024 and cfg.trainer.max_steps == 1500
    assert cfg.data._target_ == "data.live.LiveActivationDataModule"  # like the Pythia preset: no cache
    assert compose_train(["experiment=paper_tiny", "data=shards"], tmp_path).data.path is None  # a cache on request
