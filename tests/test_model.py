"""The crosscoder's math against independent float64 computations in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crosscoder.metrics import ExplainedVariance, FeatureFiring, l0
from crosscoder.model import Crosscoder


def random_crosscoder(activation="relu", S=3, D=8, F=32, k=4, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    model = Crosscoder(S, D, F, activation=activation, k=k, dec_init_norm=0.3)
    with torch.no_grad():  # break the init's symmetry between snapshots so per-snapshot terms differ
        model.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        model.W_enc.add_(0.05 * torch.randn_like(model.W_enc))
        model.b_enc.normal_(0, 0.05)
        model.b_dec.normal_(0, 0.1)
    return model


def numpy_forward(model: Crosscoder, x: np.ndarray):
    W_enc = model.W_enc.detach().double().numpy()  # [S, D, F]
    W_dec = model.W_dec.detach().double().numpy()  # [F, S, D]
    pre = np.einsum("bsd,sdf->bf", x, W_enc) + model.b_enc.detach().double().numpy()
    f = np.maximum(pre, 0)
    recon = np.einsum("bf,fsd->bsd", f, W_dec) + model.b_dec.detach().double().numpy()
    return f, recon, np.linalg.norm(W_dec, axis=-1)  # [F, S]


def test_relu_loss_matches_float64_hand_computation():
    model = random_crosscoder("relu")
    x = np.random.default_rng(1).standard_normal((64, 3, 8))
    f, recon, dec_norms = numpy_forward(model, x)
    out = model(torch.tensor(x, dtype=torch.float32))
    terms = model.loss_terms(torch.tensor(x, dtype=torch.float32), out)

    mse = ((x - recon) ** 2).sum(axis=(1, 2)).mean()  # summed over snapshots and dims, mean over tokens
    sparsity = (f * dec_norms.sum(-1)).sum(-1).mean()  # f_i * sum_s ||W_dec[i, s]|| (not the joint norm)
    np.testing.assert_allclose(out.recon.detach().numpy(), recon, rtol=1e-4, atol=1e-5)
    assert terms.mse.item() == pytest.approx(mse, rel=1e-5)
    assert terms.sparsity.item() == pytest.approx(sparsity, rel=1e-5)
    assert terms.l0.item() == pytest.approx((f > 0).sum(-1).mean())
    # The sum of per-snapshot norms is what lets a latent be absent at some snapshots: it is strictly
    # larger than the norm of the concatenated decoder whenever a latent lives at more than one snapshot.
    assert sparsity > (f * np.linalg.norm(model.W_dec.detach().double().numpy().reshape(32, -1), axis=-1)).sum(-1).mean()


def test_explained_variance_matches_float64_hand_computation():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 3, 8)) * np.array([1.0, 5.0, 20.0])[None, :, None] + 3.0
    a_hat = a + rng.standard_normal(a.shape) * np.array([0.1, 1.0, 2.0])[None, :, None]
    metric = ExplainedVariance(3, 8)
    for i in range(0, 300, 64):  # in batches, as validation feeds it
        metric.update(torch.tensor(a[i:i + 64], dtype=torch.float32), torch.tensor(a_hat[i:i + 64], dtype=torch.float32))
    err = ((a - a_hat) ** 2).sum(axis=(0, 2))
    var = ((a - a.mean(0)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(metric.compute().numpy(), 1 - err / var, rtol=1e-5)
    assert metric.overall().item() == pytest.approx(1 - err.sum() / var.sum(), rel=1e-5)


def test_topk_keeps_exactly_k_latents_ranked_by_decoder_weighted_value():
    model = random_crosscoder("topk", k=4)
    x = torch.randn(50, 3, 8)
    out = model(x)
    assert ((out.latents > 0).sum(-1) <= 4).all() and ((out.latents > 0).sum(-1) == 4).float().mean() > 0.9
    score = torch.relu(out.pre_acts) * model.decoder_norms().sum(-1)
    kept = out.latents > 0
    # every kept latent scores at least as high as every dropped one on the same token
    assert (score.masked_fill(~kept, float("inf")).min(-1).values >= score.masked_fill(kept, -1).max(-1).values).all()


def test_batchtopk_keeps_k_per_token_on_average_and_thresholds_at_inference():
    model = random_crosscoder("batchtopk", F=64, k=3)
    B = 2000
    g = torch.Generator().manual_seed(1)
    out = model.train()(torch.randn(B, 3, 8, generator=g))
    assert (out.latents > 0).sum().item() == 3 * B  # exactly k x B latents over the batch
    assert model.batchtopk_threshold.item() > 0
    # The inference threshold is judged on a FRESH batch of the same distribution (on the batch that set it,
    # it reproduces the selection by construction). The latents active per token, c, are a mean over B
    # independent tokens; the threshold batch gives exactly k, so the fresh batch's mean differs from k by
    # the difference of two independent means of B tokens: sd = sqrt(2 var(c) / B) (~0.05 here). Allow 4 sd.
    fresh = model.eval()(torch.randn(B, 3, 8, generator=g))
    per_token = (fresh.latents > 0).sum(-1).double()
    sd = math.sqrt(2 * per_token.var().item() / B)
    assert 0 < sd < 0.2
    assert abs(per_token.mean().item() - 3) < 4 * sd, (per_token.mean().item(), sd)


def test_jumprelu_threshold_gradient_is_the_straight_through_estimate():
    torch.manual_seed(0)
    model = Crosscoder(1, 2, 3, activation="jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.2,
                       dec_init_norm=0.5)
    pre = torch.tensor([[0.9, 1.16, 2.0], [1.04, 0.4, 0.82]])
    g = pre * 0.5  # the gate reads the contribution pre * sum_s ||W_dec[i, s]|| (here 0.5)
    f = model.activate(pre)
    assert torch.equal(f, pre * (g > 0.5))
    f.sum().backward()
    # d/dt [pre H(pre n - t)] ~ -(pre / eps) * 1{|pre n - t| < eps/2}; chain rule through t = exp(log t) multiplies by t
    window = ((g - 0.5).abs() < 0.1).double()
    expected = (-(pre.double() / 0.2) * window).sum(0) * 0.5
    assert window.sum() == 4  # open (0.52, 0.58) and closed (0.45, 0.41) entries
    np.testing.assert_allclose(model.log_threshold.grad.numpy(), expected.numpy(), rtol=1e-5)


def test_init_repeats_one_direction_for_every_snapshot_and_encoder_is_its_transpose():
    model = Crosscoder(4, 8, 16, dec_init_norm=0.2)
    norms = model.decoder_norms()
    torch.testing.assert_close(norms, torch.full((16, 4), 0.2))
    torch.testing.assert_close(model.W_dec[:, 0], model.W_dec[:, 3])
    torch.testing.assert_close(model.W_enc, model.W_dec.permute(1, 2, 0))


def test_save_load_round_trip(tmp_path):
    model = random_crosscoder("jumprelu")
    model.scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    model.save(tmp_path)
    loaded = Crosscoder.load(tmp_path)
    assert loaded.activation == "jumprelu" and loaded.snapshot_names == model.snapshot_names
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    with pytest.raises(FileNotFoundError, match="crosscoder.safetensors"):
        Crosscoder.load(tmp_path / "nowhere")


def test_dead_features_and_l0():
    firing = FeatureFiring(4, window=10)
    firing.update(torch.tensor([[1.0, 0, 0, 0]] * 6))
    assert firing.compute().item() == 0  # nothing has gone 10 tokens silent yet
    firing.update(torch.tensor([[0.0, 2.0, 0, 0]] * 6))
    assert firing.dead_mask().tolist() == [False, False, True, True]
    assert l0(torch.tensor([[1.0, 0, 3], [0, 0, 0]])).item() == 1.0


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="crosscoder.activation: 'gelu'"):
        Crosscoder(2, 4, 8, activation="gelu")
