"""Every path of the paper activation against a float64 reference of its [B, S, F] formulas: the dense path snapshot
by snapshot (crosscoder/paper_loop.py), the sparse path with the window entries listed, and the sparse path with the
open entries only plus the closed window entries' pass. Loss terms and the gradient of every parameter, the
threshold's straight-through estimate included."""

from __future__ import annotations

import pytest
import torch

from crosscoder import sparse
from crosscoder.model import Crosscoder
from tests.test_paper import paper_model


def reference(model: Crosscoder, x: torch.Tensor, l1_coef: float) -> tuple[dict, dict]:
    """float64 loss terms and gradients of mse + l1_coef * tanh-quad penalty, from the [B, S, F] formulas: gates
    H(pre ||W_dec[i, s]|| - t) with the straight-through estimate d gate / dt = -1/eps inside |g - t| < eps / 2 (and
    no gradient to g), written as gate + (-window / eps) (t - stop_gradient(t))."""
    p = {n: q.detach().double().requires_grad_() for n, q in model.named_parameters()}
    x = x.double()
    eps, c, s_ = model.jumprelu_bandwidth, model.tanh_c, model.tanh_s
    pre = torch.einsum("bsd,sdf->bf", x, p["W_enc"]) + p["b_enc"]
    norms = p["W_dec"].norm(dim=-1).T  # [S, F]
    t = p["log_threshold"].exp()
    with torch.no_grad():
        g = pre[:, None, :] * norms
        gate, window = (g > t).double(), ((g - t).abs() < eps / 2).double()
    f = pre[:, None, :] * (gate - window / eps * (t - t.detach()))  # [B, S, F]
    recon = torch.einsum("bsf,fsd->bsd", f, p["W_dec"]) + p["b_dec"]
    mse = (recon - x).pow(2).sum(dim=(1, 2)).mean()
    q = torch.tanh(c * f * norms).mean(dim=(0, 1))
    penalty = (q * (1 + q / s_)).sum()
    (mse + l1_coef * penalty).backward()
    counts = {"open": int(gate.sum()), "closed_window": int((window * (1 - gate)).sum())}
    return {"mse": mse.item(), "sparsity": penalty.item(), "recon": recon.detach(), "f": f.detach(), **counts}, \
        {n: q.grad for n, q in p.items()}


@pytest.fixture(params=["dense", "listed", "passed"])
def path(request, monkeypatch):
    """dense: sparse=False (snapshot by snapshot); listed / passed: sparse=True with the candidate cap lifted (the
    window entries listed) or at 0 (open entries only, the window by the pass)."""
    if request.param != "dense":
        monkeypatch.setattr(sparse, "PAPER_MAX_CANDIDATES", 1.0 if request.param == "listed" else 0.0)
    return request.param


@pytest.mark.parametrize("S,D,F,B,bandwidth", [(3, 6, 20, 40, 0.5), (4, 8, 64, 33, 2.0), (2, 5, 30, 17, 0.05)])
def test_every_paper_path_matches_the_float64_formulas(path, S, D, F, B, bandwidth):
    model = paper_model(S, D, F, bandwidth=bandwidth, seed=1)
    model.sparse = path != "dense"
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2))
    ref, ref_grads = reference(model, x, l1_coef=0.3)
    assert ref["open"] > 5 and ref["closed_window"] > 5  # both kinds of entries are there
    out = model(x)
    terms = model.loss_terms(x, out)
    (terms.mse + 0.3 * terms.sparsity).backward()
    if path == "dense":
        assert out.active is None
    else:
        assert isinstance(out.active, sparse.PaperActive)
        assert len(out.active.values) == ref["open"] + (ref["closed_window"] if path == "listed" else 0)
    torch.testing.assert_close(out.recon.double(), ref["recon"], rtol=1e-4, atol=1e-5)
    codes = torch.stack([out.snapshot_code(s) for s in range(S)], 1)
    torch.testing.assert_close(codes.double(), ref["f"], rtol=1e-5, atol=1e-6)
    assert terms.mse.item() == pytest.approx(ref["mse"], rel=1e-5)
    assert terms.sparsity.item() == pytest.approx(ref["sparsity"], rel=1e-5)
    for name, q in model.named_parameters():
        torch.testing.assert_close(q.grad.double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ref_grads["log_threshold"].abs().sum() > 0


def test_dense_and_sparse_paths_agree_under_bf16_autocast(monkeypatch):
    """Under autocast the GEMMs run in bf16 (the backward's too, cast by hand). The two paths see the same bf16
    pre-activations, so the same gates: they agree within bf16 GEMM rounding; against float32 some gates flip
    (pre itself is rounded), so that comparison is looser."""
    monkeypatch.setattr(sparse, "PAPER_MAX_CANDIDATES", 0.0)  # the sparse run takes the window pass
    x = torch.randn(64, 4, 16)
    grads = {}
    for name, autocast, force in [("fp32", False, False), ("dense bf16", True, False), ("passed bf16", True, True)]:
        model = paper_model(4, 16, 96, bandwidth=2.0, seed=3)
        model.sparse = force
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            terms = model.loss_terms(x, out)
            (terms.mse + 0.3 * terms.sparsity).backward()
        assert (out.active is not None) == force
        grads[name] = {n: q.grad.clone() for n, q in model.named_parameters()}
    for p, g in grads["passed bf16"].items():
        ref = grads["dense bf16"][p]
        assert (g - ref).norm() <= 0.01 * ref.norm() + 1e-6, p
        assert (g - grads["fp32"][p]).norm() <= 0.05 * grads["fp32"][p].norm() + 1e-6, p


def test_the_compiled_element_wise_functions_equal_the_eager_ones():
    """On CUDA each snapshot's element-wise work (the dense path's forward and backward, the window pass's mask) is
    one torch.compile'd kernel; here the same functions are compiled for the CPU (inductor's C++ backend). The window
    mask gives the same bits (window edges included); the dense functions agree within float32 rounding (a fused
    kernel may sum in another order)."""
    import shutil

    from crosscoder import paper_loop
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for inductor's CPU backend")
    torch.manual_seed(0)
    B, F = 64, 96
    pre = torch.randn(B, F) * 2
    norm, t = torch.rand(F) + 0.1, torch.rand(F) * 0.5 + 0.05
    pre[0, :8] = t[:8] / norm[:8]  # entries at the edge g = t (closed, inside the window)
    pre[1, :8] = (t[:8] - 1.0) / norm[:8]  # and near the window's far edge
    mask = torch.compile(paper_loop._closed_window_pre, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        eager = paper_loop._closed_window_pre(pre, norm, t, 1.0, dtype)
        assert (eager != 0).any() and (eager == 0).any()
        assert torch.equal(mask(pre, norm, t, 1.0, dtype), eager)
    any_open = torch.rand(B, F) < 0.1
    fwd_args = (pre, norm, t, 4.0, any_open, torch.bfloat16)
    bwd_args = (pre, norm, t, 1.0, 4.0, torch.randn(B, F).bfloat16(), torch.randn(F), torch.randn(B, F), torch.bfloat16)
    for fn, args in ((paper_loop._dense_forward_snapshot, fwd_args), (paper_loop._dense_backward_snapshot, bwd_args)):
        for got, want in zip(torch.compile(fn, dynamic=False)(*args), fn(*args)):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
