"""The sparse TopK fast path against the dense reference: same forward, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from crosscoder.model import Crosscoder


@pytest.mark.parametrize("B,S,D,F,k", [(64, 3, 8, 256, 4), (33, 2, 16, 512, 16)])
def test_sparse_topk_equals_dense(B, S, D, F, k):
    torch.manual_seed(0)
    dense = Crosscoder(S, D, F, activation="topk", k=k, dec_init_norm=0.3, sparse_topk=False)
    with torch.no_grad():
        dense.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        dense.b_enc.normal_(0, 0.1)
        dense.b_dec.normal_(0, 0.1)
    fast = Crosscoder(S, D, F, activation="topk", k=k, sparse_topk=True)
    fast.load_state_dict(dense.state_dict())
    x = torch.randn(B, S, D)
    outs, grads = [], []
    for model in (dense, fast):
        out = model(x)
        terms = model.loss_terms(x, out)
        (terms.mse + 0.7 * terms.sparsity).backward()
        outs.append((out, terms))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    (od, td), (of, tf) = outs
    assert of.pre_acts is None and od.pre_acts is not None  # the fast path really ran
    torch.testing.assert_close(of.latents, od.latents)
    torch.testing.assert_close(of.recon, od.recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.mse, td.mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf.sparsity, td.sparsity)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_path_switches_on_automatically_only_where_it_wins():
    assert Crosscoder(2, 8, 1024, activation="topk", k=32).use_sparse_topk()
    assert not Crosscoder(2, 8, 256, activation="topk", k=32).use_sparse_topk()
    assert not Crosscoder(2, 8, 1024, activation="relu").use_sparse_topk()
    with torch.no_grad():  # inference keeps pre-activations for analysis
        assert not Crosscoder(2, 8, 1024, activation="topk", k=32).use_sparse_topk()
