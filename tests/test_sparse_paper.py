"""The sparse paths of the paper activation (crosscoder/sparse.py) against its dense path: same forward outputs, loss
terms and every parameter gradient (log_threshold's straight-through window entries included). Each test runs both
sparse routes: the window entries listed, and only the open ones listed with the closed window entries' threshold
gradient from crosscoder/paper_loop.py's pass ("route" below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosscoder import sparse
from crosscoder.model import Crosscoder


@pytest.fixture(params=["listed", "passed"])
def route(request, monkeypatch):
    """How the sparse path treats the closed entries inside the threshold's window: listed as entries (the candidate
    cap lifted), or left to the window pass (cap 0: candidates are never few enough to list the window)."""
    monkeypatch.setattr(sparse, "PAPER_MAX_CANDIDATES", 1.0 if request.param == "listed" else 0.0)
    return request.param


def pair(S: int, D: int, F: int, bias: float = 0.0, bandwidth: float = 0.3, log_t=(-2.5, -1.0)):
    """The same random paper crosscoder twice: forced dense, forced sparse. Decoder norms differ per snapshot, so a
    latent's gates differ between snapshots; thresholds differ per latent."""
    torch.manual_seed(0)
    dense = Crosscoder(S, D, F, activation="paper", dec_init_norm=0.3, jumprelu_bandwidth=bandwidth, sparse=False)
    with torch.no_grad():
        dense.W_dec.mul_(torch.rand(F, S, 1) * 1.5 + 0.1)
        dense.W_enc.add_(0.1 * torch.randn_like(dense.W_enc))
        dense.b_enc.copy_(bias - 0.1 * torch.rand(F))
        dense.b_dec.normal_(0, 0.1)
        dense.log_threshold.copy_(torch.linspace(*log_t, F)[torch.randperm(F)])
    fast = Crosscoder(S, D, F, activation="paper", jumprelu_bandwidth=bandwidth, sparse=True)
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
    assert od.active is None and isinstance(of.active, sparse.PaperActive)  # each path really ran
    assert gd.keys() == gf.keys() and "log_threshold" in gd
    torch.testing.assert_close(of.latents, od.latents)
    torch.testing.assert_close(of.pre_acts, od.pre_acts.detach())
    for s in range(x.shape[1]):  # the per-snapshot codes that analysis/splice.py decodes
        torch.testing.assert_close(of.snapshot_code(s), od.snapshot_code(s))
    torch.testing.assert_close(of.recon, od.recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.mse, td.mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.sparsity, td.sparsity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tf.l0, td.l0)
    for name in gd:
        torch.testing.assert_close(gf[name], gd[name], rtol=1e-4, atol=1e-5, msg=name)
    return od, of


def window_counts(model: Crosscoder, out) -> tuple[int, int]:
    """(open entries, closed entries in the threshold's window) of the dense forward, counted over [B, S, F]."""
    g = out.pre_acts.detach()[:, None, :] * model.decoder_norms().detach().T
    t = model.log_threshold.detach().exp()
    open_ = g > t
    window = (g - t).abs() < model.jumprelu_bandwidth / 2
    return int(open_.sum()), int((window & ~open_).sum())


@pytest.mark.parametrize("B,S,D,F", [(64, 3, 8, 256), (33, 2, 16, 512), (20, 5, 4, 64)])
def test_sparse_paper_equals_dense_with_threshold_window_entries(B, S, D, F, route):
    dense, fast = pair(S, D, F, bias=-0.1)
    x = torch.randn(B, S, D)
    x[5] = 0  # pre = b_enc < 0 everywhere: nothing open on this token
    x[6] = 0.01 * x[6]
    od, of = run_both(dense, fast, x)
    n_open, n_closed_window = window_counts(dense, od)
    on = torch.stack([od.snapshot_code(s) for s in range(S)], 1) != 0
    assert (on.any(1) & ~on.all(1)).any()  # a latent on at one snapshot and off at another
    assert n_closed_window > 10 and n_open > 10 and (od.latents[5] == 0).all()  # the cases that matter are there
    assert dense.log_threshold.grad.abs().sum() > 0
    # the kept set is exactly the open entries and (listed) the closed ones in the window, nothing else
    assert len(of.active.values) == n_open + (n_closed_window if route == "listed" else 0)
    assert int((of.active.values != 0).sum()) == n_open


def test_sparse_paper_gradients_without_the_penalty(route):
    dense, fast = pair(2, 8, 128, bias=0.05, bandwidth=0.1)
    run_both(dense, fast, torch.randn(40, 2, 8), l1_coef=0.0)


@pytest.mark.parametrize("bandwidth", [0.01, 0.3])
def test_sparse_paper_with_nothing_open_in_the_whole_batch(bandwidth, route):
    # b_enc = -0.2: pre < 0 nearly everywhere, and g = pre * norm < 0 < t everywhere; with the wide window some closed
    # entries still get a threshold gradient, with the narrow one none
    dense, fast = pair(3, 8, 128, bias=-0.2, bandwidth=bandwidth)
    with torch.no_grad():
        for model in (dense, fast):
            model.W_enc.mul_(0.01)
    od, of = run_both(dense, fast, torch.randn(16, 3, 8))
    assert (od.latents == 0).all() and (of.active.values == 0).all()
    assert (len(of.active.values) == 0) == (bandwidth < 0.1 or route == "passed")


def test_sparse_paper_under_no_grad_as_the_analysis_runs_it(route):
    dense, fast = pair(3, 8, 256, bias=-0.1)
    x = torch.randn(50, 3, 8)
    with torch.no_grad():
        od, of = dense.eval()(x), fast.eval()(x)
    torch.testing.assert_close(of.recon, od.recon, rtol=1e-5, atol=1e-5)
    for s in range(3):
        torch.testing.assert_close(of.snapshot_code(s), od.snapshot_code(s))


def test_the_batch_density_chooses_the_paper_path():
    torch.manual_seed(0)
    S, F = 2, 2048
    model = Crosscoder(S, 8, F, activation="paper", jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.001)
    x = torch.randn(16, S, 8)
    pre = model.encode_pre(x).detach()
    norm = model.decoder_norms()[0, 0].item()  # every latent's decoder norm at init, at every snapshot
    for open_per_snapshot, sparse_path in [(1800, False), (200, False), (40, True), (4, True)]:
        with torch.no_grad():  # a bias that leaves about this many latents open per token and snapshot
            b = 0.05 / norm - pre.flatten().quantile(1 - open_per_snapshot / F).item()
            model.b_enc.fill_(b)
        out = model(x)
        assert isinstance(out.active, sparse.PaperActive) == sparse_path, open_per_snapshot
        assert (out.latents > 0).sum(-1).float().mean().item() == pytest.approx(open_per_snapshot, rel=0.2)
    assert Crosscoder(S, 8, F, activation="paper", sparse=False)(x).active is None
    # the preset's straight-through window (bandwidth 2 around t = 0.1) holds every entry: too many to list, so the
    # sparse path lists the open entries only (the window's gradient from the pass) while few are open, and the
    # dense path runs when many are
    preset = Crosscoder(S, 8, F, activation="paper", jumprelu_init_threshold=0.1, jumprelu_bandwidth=2.0)
    pre = preset.encode_pre(x).detach()
    norm = preset.decoder_norms()[0, 0].item()
    with torch.no_grad():
        g = pre[:, None, :] * preset.decoder_norms().T
        assert ((g - 0.1).abs() < 1.0).float().mean() > 0.99  # nearly every entry inside the window
    for open_per_snapshot, sparse_path in [(600, False), (20, True)]:
        with torch.no_grad():
            preset.b_enc.fill_(0.1 / norm - pre.flatten().quantile(1 - open_per_snapshot / F).item())
        out = preset(x)
        assert isinstance(out.active, sparse.PaperActive) == sparse_path, open_per_snapshot
        if sparse_path:  # the open entries only
            assert (out.active.values > 0).all() and len(out.active.values) < 1.5 * open_per_snapshot * S * len(x)


def test_candidates_are_a_superset_of_the_kept_entries():
    torch.manual_seed(1)
    F, S = 300, 4
    pre = torch.randn(50, F)
    norms = torch.rand(F, S) * 2
    norms[:5, 1] = 0  # a latent with no decoder at some snapshot
    threshold = torch.rand(F) * 0.5 + 0.01
    for bandwidth in (0.001, 0.2, 1.5):
        g = pre[:, None, :] * norms.T
        keep = (g > threshold) | ((g - threshold).abs() < bandwidth / 2)  # [B, S, F]
        cand = sparse.paper_candidates(pre, norms, threshold, bandwidth)
        assert not (keep.any(1) & ~cand).any()
        e = sparse.paper_entries(pre, norms, threshold, bandwidth, cand)
        assert len(e.rows) == int(keep.sum())
        want = sorted(zip(*(t.tolist() for t in keep.permute(0, 1, 2).nonzero(as_tuple=True))))
        assert list(zip(e.rows.tolist(), e.snaps.tolist(), e.cols.tolist())) == want  # (token, snapshot) order
        np.testing.assert_array_equal(e.open.numpy(), (g > threshold)[e.rows, e.snaps, e.cols].numpy())


@pytest.mark.parametrize("which", ["recon", "sparsity"])
def test_sparse_paper_gradients_of_one_output_alone(which):
    """Backward from the reconstruction alone (no penalty), or from the penalty alone (no reconstruction)."""
    dense, fast = pair(3, 8, 256, bias=-0.1)
    x = torch.randn(30, 3, 8)
    grads = []
    for model in (dense, fast):
        out = model(x)
        loss = out.recon.pow(2).sum() if which == "recon" else model.loss_terms(x, out).sparsity
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "W_dec" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)

