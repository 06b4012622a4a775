"""crosscoder=jumprelu (issue 13 item 1): the loss cannot be lowered by rescaling a latent; old checkpoints load
with the same gates; on planted-feature data it reaches a sparse code about as good as relu's at that L0."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from crosscoder.metrics import ExplainedVariance
from crosscoder.model import Crosscoder

S, D, F = 3, 8, 64


def jumprelu_model(sparse: bool | None = False, seed: int = 0) -> Crosscoder:
    torch.manual_seed(seed)
    model = Crosscoder(S, D, F, activation="jumprelu", dec_init_norm=0.3, jumprelu_bandwidth=0.4, sparse=sparse)
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        model.W_enc.add_(0.1 * torch.randn_like(model.W_enc))
        model.b_enc.normal_(0, 0.05)
        model.b_dec.normal_(0, 0.1)
        model.log_threshold.copy_(torch.empty(F).uniform_(math.log(0.1), math.log(0.6)))
    return model


def rescaled(model: Crosscoder, c: torch.Tensor, sparse: bool | None) -> Crosscoder:
    """W_enc[:, :, i], b_enc[i] times c[i], W_dec[i] divided by c[i]; thresholds and b_dec unchanged."""
    other = Crosscoder(S, D, F, activation="jumprelu", jumprelu_bandwidth=model.jumprelu_bandwidth, sparse=sparse)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.W_enc.mul_(c)
        other.b_enc.mul_(c)
        other.W_dec.div_(c[:, None, None])
    return other


def loss_and_grads(model: Crosscoder, x: torch.Tensor, l1_coef: float = 0.7):
    out = model(x)
    terms = model.loss_terms(x, out)
    (terms.mse + l1_coef * terms.sparsity).backward()
    return out, terms, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sparse", [False, True])
def test_rescaling_a_latent_changes_neither_the_loss_nor_what_its_gradient_does(sparse):
    """The rescaling of issue 13 (W_enc, b_enc x c, W_dec / c) used to divide the penalty by c with every gate
    unchanged. Now: the same reconstruction, L0 and penalty; the gradients transform covariantly (W_enc, b_enc by
    1/c, W_dec by c, the rest unchanged), and the loss has no slope along the rescaling itself, so no optimiser
    step can lower it by shrinking decoders."""
    model = jumprelu_model(sparse)
    x = 2 * torch.randn(96, S, D)
    c = torch.exp(torch.empty(F).uniform_(math.log(0.1), math.log(10.0)))
    scaled = rescaled(model, c, sparse)
    o1, t1, g1 = loss_and_grads(model, x)
    o2, t2, g2 = loss_and_grads(scaled, x)
    assert (o1.active is not None) == sparse == (o2.active is not None)
    assert 5 < float(t1.l0) < F - 5 and g1["log_threshold"].abs().sum() > 0  # gates open and shut, thresholds learn
    torch.testing.assert_close(o2.recon, o1.recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o2.latents, o1.latents * c, rtol=1e-4, atol=1e-5)
    assert torch.equal(o1.latents > 0, o2.latents > 0)
    torch.testing.assert_close(t2.mse, t1.mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2.sparsity, t1.sparsity)
    torch.testing.assert_close(t2.l0, t1.l0)
    tol = dict(rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(g2["W_enc"] * c, g1["W_enc"], **tol)
    torch.testing.assert_close(g2["b_enc"] * c, g1["b_enc"], **tol)
    torch.testing.assert_close(g2["W_dec"] / c[:, None, None], g1["W_dec"], **tol)
    torch.testing.assert_close(g2["b_dec"], g1["b_dec"], **tol)
    torch.testing.assert_close(g2["log_threshold"], g1["log_threshold"], **tol)
    # d loss / d log c_i at c = 1: <W_enc_i, dW_enc_i> + b_enc_i db_enc_i - <W_dec_i, dW_dec_i> = 0 for every latent
    slope = ((model.W_enc * g1["W_enc"]).sum((0, 1)) + model.b_enc * g1["b_enc"]
             - (model.W_dec * g1["W_dec"]).sum((1, 2))).detach()
    scale = ((model.W_enc * g1["W_enc"]).abs().sum((0, 1)) + (model.W_dec * g1["W_dec"]).abs().sum((1, 2))).detach()
    assert (slope.abs() <= 1e-4 * scale + 1e-6).all(), slope.abs().max()


def test_one_optimiser_step_keeps_the_rescaled_model_equivalent():
    """SGD with each parameter's step scaled as the rescaling scales its square (c^2 for W_enc and b_enc, 1/c^2 for
    W_dec: the natural step on the rescaling orbit) takes the rescaled model to the rescaling of the original's
    next state: same reconstruction and L0 after the step."""
    model = jumprelu_model(False)
    x = 2 * torch.randn(96, S, D)
    c = torch.exp(torch.empty(F).uniform_(math.log(0.2), math.log(5.0)))
    scaled = rescaled(model, c, False)
    lr = 0.05
    for m, (enc, dec) in ((model, (torch.ones(F), torch.ones(F))), (scaled, (c ** 2, c ** -2))):
        _, _, g = loss_and_grads(m, x)
        with torch.no_grad():
            m.W_enc.sub_(lr * enc * g["W_enc"])
            m.b_enc.sub_(lr * enc * g["b_enc"])
            m.W_dec.sub_(lr * dec[:, None, None] * g["W_dec"])
            m.b_dec.sub_(lr * g["b_dec"])
            m.log_threshold.sub_(lr * g["log_threshold"])
    with torch.no_grad():
        y = 2 * torch.randn(96, S, D)
        o1, o2 = model(y), scaled(y)
        t1, t2 = model.loss_terms(y, o1), scaled.loss_terms(y, o2)
    torch.testing.assert_close(o2.recon, o1.recon, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t2.l0, t1.l0)
    torch.testing.assert_close(t2.sparsity, t1.sparsity)


def test_version1_states_load_with_the_same_gates(tmp_path):
    """A state saved before the change (threshold compared with pre) converts on load (t * sum_s ||W_dec[i, s]||)
    so that exactly the same gates open: from a Lightning-style state_dict (nn.Module's version marker 1) and from a
    crosscoder.safetensors without a version. A plain dict without any marker is taken as current."""
    from safetensors.torch import save_file

    old = jumprelu_model(False)
    x = 2 * torch.randn(64, S, D)
    pre = old.encode_pre(x).detach()
    t_old = old.log_threshold.detach().exp()
    expected = pre * (pre > t_old)  # what version 1 computed
    assert 0 < (expected > 0).float().mean() < 0.9

    state = old.state_dict()
    state._metadata[""]["version"] = 1
    new = Crosscoder(S, D, F, activation="jumprelu", sparse=False)
    new.load_state_dict(state)
    torch.testing.assert_close(new.activate(pre), expected)

    import json
    tensors = {k: v.contiguous() for k, v in old.state_dict().items()}
    save_file(tensors, str(tmp_path / "crosscoder.safetensors"), metadata={"config": json.dumps(old.config())})
    loaded = Crosscoder.load(tmp_path)
    torch.testing.assert_close(loaded.activate(pre), expected)

    plain = Crosscoder(S, D, F, activation="jumprelu", sparse=False)
    plain.load_state_dict(OrderedDict(old.state_dict().items()))
    torch.testing.assert_close(plain.log_threshold, old.log_threshold)
    old.save(tmp_path)  # a current file round-trips unchanged
    torch.testing.assert_close(Crosscoder.load(tmp_path).log_threshold, old.log_threshold)


@functools.lru_cache(maxsize=1)
def _planted_features_data():
    """data.synthetic's generator (what ``python -m data.synthetic`` writes), small: S=3, D=32, 64 features, 3 active
    per token; normalised as the datamodule does (mean norm sqrt(D) per snapshot). 64 training batches of 512
    tokens, cycled, and 4,096 held-out tokens from other chunks of the stream."""
    from data.synthetic import SyntheticConfig, make_truth, sample_chunk

    syn = SyntheticConfig(n_snapshots=3, d_model=32, n_features=64, mean_active=3.0, noise_std=0.1)
    truth = make_truth(syn)
    train = torch.from_numpy(np.stack([sample_chunk(truth, c, 512)[0] for c in range(64)]))  # [64, 512, S, D]
    scale = math.sqrt(syn.d_model) / train.norm(dim=-1).mean((0, 1))  # [S]
    val = torch.from_numpy(sample_chunk(truth, 1_000_000, 4096)[0])
    return syn, train * scale[:, None], val * scale[:, None]


def _train_on_planted_features(activation: str, l1_coef: float, steps: int, crosscoder_cfg) -> tuple[float, float]:
    """(explained variance, L0) on held-out tokens after ``steps`` Adam steps on ``_planted_features_data``; the
    jumprelu settings (window, initial threshold, threshold learning rate) are those of crosscoder=jumprelu."""
    syn, train, val = _planted_features_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 at this size when other jobs share the cores
    try:
        return _train(syn, train, val, activation, l1_coef, steps, crosscoder_cfg)
    finally:
        torch.set_num_threads(threads)


def _train(syn, train, val, activation, l1_coef, steps, crosscoder_cfg):
    torch.manual_seed(0)
    cc = Crosscoder(syn.n_snapshots, syn.d_model, 256, activation=activation,
                    jumprelu_init_threshold=crosscoder_cfg.jumprelu_init_threshold,
                    jumprelu_bandwidth=crosscoder_cfg.jumprelu_bandwidth)
    cc.init_b_dec(train.mean((0, 1)))
    lr = float(crosscoder_cfg.lr)
    thresholds = [p for n, p in cc.named_parameters() if n == "log_threshold"]
    groups = [{"params": [p for n, p in cc.named_parameters() if n != "log_threshold"]}]
    groups += [{"params": thresholds, "lr": lr * crosscoder_cfg.threshold_lr_factor}] if thresholds else []
    opt = torch.optim.Adam(groups, lr=lr)
    for step in range(steps):
        x = train[step % len(train)]
        out = cc(x)
        terms = cc.loss_terms(x, out)
        warm = min(1.0, (step + 1) / (0.05 * steps))
        opt.zero_grad(set_to_none=True)
        (terms.mse + warm * l1_coef * terms.sparsity).backward()
        opt.step()
    ev = ExplainedVariance(syn.n_snapshots, syn.d_model)
    with torch.no_grad():
        out = cc(val)
        ev.update(val, out.recon)
    return float(ev.overall()), float((out.latents > 0).sum(-1).float().mean())


# l1_coef of each (measured, 800 steps; the true code has 3 features per token): jumprelu 1 -> L0 7.1, EV 0.974;
# relu 2 -> L0 10.9, EV 0.967 (relu 3 -> L0 9.6, EV 0.940; relu 5 -> L0 8.9, EV 0.79: L1 shrinkage costs it more and
# more variance before it gets as sparse as jumprelu)
JUMPRELU_TEST_L1, RELU_TEST_L1, TEST_STEPS = 1.0, 2.0, 800


def test_jumprelu_reaches_a_sparse_code_as_good_as_relu_at_that_l0(tmp_path):
    """On planted features (3 active per token on average) jumprelu with the preset's window, initial threshold and
    threshold learning rate lands in the L0 band 4-10 within 800 steps (13 s under load), and explains at least as
    much variance, less 0.02, as relu at a similar but higher L0 (at most 2x). With the preset of before the fix the
    code stayed dense (L0 167 in 400 steps)."""
    from tests.conftest import compose_train
    cfg = compose_train(["crosscoder=jumprelu"], tmp_path).crosscoder
    ev_j, l0_j = _train_on_planted_features("jumprelu", JUMPRELU_TEST_L1, TEST_STEPS, cfg)
    ev_r, l0_r = _train_on_planted_features("relu", RELU_TEST_L1, TEST_STEPS, cfg)
    assert 4 <= l0_j <= 10, l0_j
    assert l0_j <= l0_r <= 2 * l0_j, (l0_j, l0_r)  # the comparison is at a similar L0, relu's the larger
    assert ev_j >= ev_r - 0.02, (ev_j, ev_r)
