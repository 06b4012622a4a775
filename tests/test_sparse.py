"""The sparse fast paths (crosscoder/sparse.py) against the dense path: same forward, loss and every gradient."""

from __future__ import annotations

import pytest
import torch

from crosscoder.model import Crosscoder


def pair(activation: str, S: int, D: int, F: int, k: int = 32, bias: float = 0.0, **kwargs):
    """The same random crosscoder twice: forced dense, forced sparse."""
    torch.manual_seed(0)
    dense = Crosscoder(S, D, F, activation=activation, k=k, dec_init_norm=0.3, sparse=False, **kwargs)
    with torch.no_grad():
        dense.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        dense.W_enc.add_(0.1 * torch.randn_like(dense.W_enc))
        dense.b_enc.copy_(bias - 0.1 * torch.rand(F))
        dense.b_dec.normal_(0, 0.1)
    fast = Crosscoder(S, D, F, activation=activation, k=k, sparse=True, **kwargs)
    fast.load_state_dict(dense.state_dict())
    return dense, fast


def run_both(dense: Crosscoder, fast: Crosscoder, x: torch.Tensor, l1_coef: float = 0.7):
    """Forward, loss terms and the gradient of mse + l1_coef * sparsity of each model."""
    results = []
    for model in (dense, fast):
        out = model(x)
        terms = model.loss_terms(x, out)
        (terms.mse + l1_coef * terms.sparsity).backward()
        results.append((out, terms, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (od, td, gd), (of, tf, gf) = results
    assert od.active is None and of.active is not None  # each path really ran
    assert gd.keys() == gf.keys()
    torch.testing.assert_close(of.latents, od.latents)
    torch.testing.assert_close(of.pre_acts, od.pre_acts.detach())
    torch.testing.assert_close(of.recon, od.recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.mse, td.mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.sparsity, td.sparsity)
    torch.testing.assert_close(tf.l0, td.l0)
    for name in gd:
        torch.testing.assert_close(gf[name], gd[name], rtol=1e-4, atol=1e-5, msg=name)
    return od, of


@pytest.mark.parametrize("B,S,D,F,k", [(64, 3, 8, 256, 4), (33, 2, 16, 512, 16)])
def test_sparse_topk_equals_dense(B, S, D, F, k):
    dense, fast = pair("topk", S, D, F, k)
    run_both(dense, fast, torch.randn(B, S, D))


@pytest.mark.parametrize("B,S,D,F", [(64, 3, 8, 256), (33, 2, 16, 512)])
def test_sparse_relu_equals_dense_including_a_token_with_no_active_latent(B, S, D, F):
    dense, fast = pair("relu", S, D, F, bias=-0.3)
    x = torch.randn(B, S, D)
    x[5] = 0  # pre = b_enc < 0 everywhere: nothing fires on this token
    od, of = run_both(dense, fast, x)
    assert (od.latents[5] == 0).all() and 0 < (od.latents > 0).float().mean() < 0.5
    torch.testing.assert_close(of.recon[5], fast.b_dec.detach())


@pytest.mark.parametrize("B,S,D,F", [(64, 3, 8, 256), (33, 2, 16, 512)])
def test_sparse_jumprelu_equals_dense_with_threshold_window_entries(B, S, D, F):
    # a wide straight-through window so that many entries sit in it, open and closed
    dense, fast = pair("jumprelu", S, D, F, bias=-0.1, jumprelu_init_threshold=0.2, jumprelu_bandwidth=0.3)
    with torch.no_grad():  # thresholds differ per latent
        for model in (dense, fast):
            model.log_threshold.copy_(torch.linspace(-2.5, -1.0, F))
    x = torch.randn(B, S, D)
    x[5] = 0
    x[6] = 0.01 * x[6]
    od, of = run_both(dense, fast, x)
    # the gate reads the contribution g = pre * sum_s ||W_dec[i, s]||
    g = od.pre_acts.detach() * dense.decoder_norms().sum(-1).detach()
    t = dense.log_threshold.exp().detach()
    closed_in_window = (g <= t) & ((g - t).abs() < 0.15)
    assert closed_in_window.sum() > 10 and (od.latents[5] == 0).all()  # the cases that matter are there
    assert dense.log_threshold.grad.abs().sum() > 0
    # the closed window entries are in the sparse set, with value 0
    assert len(of.active.values) == (od.latents > 0).sum() + closed_in_window.sum()


def test_sparse_jumprelu_gradients_at_lower_sparsity_coefficients():
    dense, fast = pair("jumprelu", 2, 8, 128, bias=0.05, jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1)
    run_both(dense, fast, torch.randn(40, 2, 8), l1_coef=0.0)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_the_batch_density_chooses_the_path(activation):
    torch.manual_seed(0)
    model = Crosscoder(2, 8, 1024, activation=activation, jumprelu_init_threshold=0.001)
    x = torch.randn(16, 2, 8)
    pre = model.encode_pre(x).detach()
    for active_per_token, sparse_path in [(900, False), (64, False), (24, True), (4, True)]:
        with torch.no_grad():  # a bias that leaves about this many latents open per token
            model.b_enc.fill_(-pre.flatten().quantile(1 - active_per_token / 1024).item())
        out = model(x)
        assert (out.active is not None) == sparse_path, active_per_token
        assert (out.latents > 0).sum(-1).float().mean().item() == pytest.approx(active_per_token, rel=0.2)


def test_sparse_path_switches_on_automatically_only_where_it_wins():
    assert Crosscoder(2, 8, 1024, activation="topk", k=32)(torch.randn(4, 2, 8)).active is not None
    assert Crosscoder(2, 8, 256, activation="topk", k=32)(torch.randn(4, 2, 8)).active is None
    assert Crosscoder(2, 8, 1024, activation="topk", k=32, sparse=False)(torch.randn(4, 2, 8)).active is None
    assert Crosscoder(2, 8, 1024, activation="relu", sparse=True)(torch.randn(4, 2, 8)).active is not None
    assert Crosscoder(2, 8, 1024, activation="batchtopk", k=32, sparse=True)(torch.randn(4, 2, 8)).active is None


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_sparse_path_with_nothing_open_in_the_whole_batch(activation):
    dense, fast = pair(activation, 2, 8, 128, bias=-50.0)
    od, of = run_both(dense, fast, torch.randn(16, 2, 8))
    assert len(of.active.values) == 0 and (od.latents == 0).all()


def test_sparse_jumprelu_gates_on_the_contribution_as_the_dense_path_does():
    """Decoder-norm sums spread over two orders of magnitude, so a gate on pre alone would open other entries than
    the gate on pre * sum_s ||W_dec[i, s]||: the sparse set is exactly the dense gate's open entries plus its closed
    window entries, and forward, loss and every gradient agree."""
    dense, fast = pair("jumprelu", 3, 8, 256, bias=0.0, jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.2)
    c = torch.exp(torch.linspace(-2.3, 2.3, 256))[torch.randperm(256, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        for model in (dense, fast):
            model.W_dec.div_(c[:, None, None])
            model.W_enc.mul_(c)
    x = 3 * torch.randn(48, 3, 8)
    od, of = run_both(dense, fast, x)
    g = od.pre_acts.detach() * dense.decoder_norms().sum(-1).detach()
    t = dense.log_threshold.exp().detach()
    open_, window = g > t, (g - t).abs() < 0.1
    assert open_.sum() > 20 and (window & ~open_).sum() > 20
    assert not torch.equal(open_, od.pre_acts.detach() > t)  # the contribution gate differs from a gate on pre
    kept = torch.zeros_like(open_)
    kept[of.active.rows, of.active.cols] = True
    assert torch.equal(kept, open_ | window) and torch.equal(od.latents > 0, open_)
