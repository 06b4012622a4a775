"""Dead-latent revival (crosscoder/revival.py): AuxK against a float64 reference, forced-dead latents coming back
through the LightningModule, resampling's weights and Adam state, and the same revival on every DDP rank."""

from __future__ import annotations

import math
import os
import socket

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from crosscoder import revival
from crosscoder.metrics import FeatureFiring
from crosscoder.model import Crosscoder
from crosscoder.module import CrosscoderModule


def _topk_crosscoder(sparse: bool, S=3, D=8, F=32, k=4, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(S, D, F, activation="topk", k=k, dec_init_norm=0.3, sparse=sparse)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        cc.W_enc.add_(0.05 * torch.randn_like(cc.W_enc))
        cc.b_enc.normal_(0, 0.05)
        cc.b_dec.normal_(0, 0.1)
    return cc


@pytest.mark.parametrize("sparse", [True, False])
def test_auxk_loss_and_gradients_match_float64_reference(sparse):
    cc = _topk_crosscoder(sparse)
    B, S, D, F, k_aux, coef = 48, 3, 8, 32, 5, 1 / 32
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(2))[:12]] = True
    out = cc(x)
    assert (out.active is not None) == sparse  # the path under test ran
    aux = revival.auxk_loss(cc, x, out, dead, k_aux, coef)
    aux.backward()

    # float64 by hand: dense pre-activations, the top-k_aux dead latents by relu(pre) * sum_s ||W_dec[i, s]||, their
    # decode without b_dec against the detached residual, normalised by the residual's variance
    W_enc = cc.W_enc.detach().double().requires_grad_()
    b_enc = cc.b_enc.detach().double().requires_grad_()
    W_dec = cc.W_dec.detach().double().requires_grad_()
    xd = x.double()
    pre = torch.einsum("bsd,sdf->bf", xd, W_enc) + b_enc
    score = torch.relu(pre.detach()) * W_dec.detach().norm(dim=-1).sum(-1)
    score[:, ~dead] = -1
    idx = score.topk(k_aux, dim=-1).indices
    f_aux = torch.zeros(B, F, dtype=torch.float64).scatter(1, idx, torch.relu(pre.gather(1, idx)))
    e_hat = torch.einsum("bf,fsd->bsd", f_aux, W_dec)
    e = xd - out.recon.detach().double()
    ref = coef * ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    ref.backward()

    assert aux.item() == pytest.approx(ref.item(), rel=1e-5)
    assert 0.5 * coef < ref.item() < 2 * coef  # not a degenerate 0: about aux_coef x the unexplained share
    for got, want in ((cc.W_enc.grad, W_enc.grad), (cc.b_enc.grad, b_enc.grad), (cc.W_dec.grad, W_dec.grad)):
        assert want.abs().max() > 1e-4
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-7)
    # only the dead latents' parameters move
    assert cc.W_dec.grad[~dead].abs().max() == 0 and cc.W_enc.grad[..., ~dead].abs().max() == 0
    assert cc.b_dec.grad is None


def test_auxk_is_zero_without_dead_latents_and_takes_at_most_the_dead():
    cc = _topk_crosscoder(True)
    x = torch.randn(16, 3, 8)
    out = cc(x)
    assert revival.auxk_loss(cc, x, out, torch.zeros(32, dtype=torch.bool), 5, 1 / 32).item() == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[7] = True  # k_aux 5 > 1 dead: one entry per token, latent 7's
    aux = revival.auxk_loss(cc, x, out, dead, 5, 1.0)
    aux.backward()
    assert aux.item() > 0 and cc.W_dec.grad[7].abs().max() > 0
    assert cc.W_dec.grad[torch.arange(32) != 7].abs().max() == 0


def _toy_batches(n=64, B=64, S=2, D=8, n_feat=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, D, generator=g), dim=-1)
    out = []
    for _ in range(n):
        code = (torch.rand(B, n_feat, generator=g) < 0.2) * torch.rand(B, n_feat, generator=g) * 3
        base = code @ dirs
        out.append(torch.stack([base * (s + 1) for s in range(S)], 1))
    return out


def _train(module: CrosscoderModule, batches, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", log_every_n_steps=5)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def _fires(module: CrosscoderModule, batches, j: int) -> bool:
    with torch.no_grad():
        return any((module.crosscoder(module.normalise(b)).latents[:, j] > 0).any() for b in batches)


@pytest.mark.parametrize("aux_coef", [0.0, 1 / 32])
def test_topk_latent_forced_dead_comes_back_with_auxk(aux_coef):
    batches = _toy_batches()
    torch.manual_seed(0)
    module = CrosscoderModule(2, 8, d_sae=16, activation="topk", k=3, l1_coef=0.0, lr=3e-3, lr_warmup_steps=0,
                              lr_decay_start=10_000, aux_coef=aux_coef, aux_k=4, revive_window_tokens=64 * 4, sparse=True)
    j = 3
    with torch.no_grad():  # latent 3 can never win a slot: its decoder is (almost) nothing, so its score is ~0
        module.crosscoder.W_dec[j] *= 1e-4
    assert not _fires(module, batches, j)
    _train(module, batches, 60)
    metrics = module.trainer.callback_metrics
    fired = module.dict_metrics[0].firing.fired_count[j]  # tokens latent 3 fired on in training
    if aux_coef == 0:  # without AuxK it never gets a gradient: dead for good (the branch below could fail)
        assert fired == 0 and not _fires(module, batches, j)
        assert "train/aux_loss" not in metrics
    else:
        assert fired > 0
        assert module.crosscoder.decoder_norms()[j].sum() > 0.1  # AuxK grew its decoder from ~1e-5
        assert "train/aux_loss" in metrics and "train/revived" in metrics


@pytest.mark.parametrize("resample_every", [0, 20])
def test_relu_latent_forced_dead_comes_back_with_resampling(resample_every):
    batches = _toy_batches()
    torch.manual_seed(0)
    module = CrosscoderModule(2, 8, d_sae=16, activation="relu", l1_coef=0.1, lr=1e-3, lr_warmup_steps=0,
                              lr_decay_start=10_000, revive_window_tokens=64 * 10, resample_every=resample_every)
    j = 5
    with torch.no_grad():
        module.crosscoder.b_enc[j] = -100.0  # never opens: no gradient reaches it from the main loss
    _train(module, batches, 45)
    assert module.dict_metrics[0].firing.fired_count[j] > 0 if resample_every else True
    if resample_every == 0:
        assert not _fires(module, batches, j)
    else:
        assert module.crosscoder.b_enc[j] > -1  # re-initialised (bias 0, then trained)
        assert _fires(module, batches, j)
        assert "train/resampled" in module.trainer.callback_metrics


@pytest.mark.parametrize("activation, until", [("topk", None), ("batchtopk", None), ("topk", 5)])
def test_topk_latent_forced_dead_comes_back_with_resampling(activation, until):
    batches = _toy_batches()
    torch.manual_seed(0)
    module = CrosscoderModule(2, 8, d_sae=16, activation=activation, k=3, l1_coef=0.0, lr=3e-3, lr_warmup_steps=0,
                              lr_decay_start=10_000, revive_window_tokens=64 * 4, resample_every=10,
                              resample_until=until, sparse=True)
    j = 3
    with torch.no_grad():  # as in the AuxK test: latent 3's score is ~0, it never wins a slot by itself
        module.crosscoder.W_dec[j] *= 1e-4
    _train(module, batches, 45)
    if until == 5:  # resampling ends before its first turn (step 10): latent 3 stays dead, and counted dead
        assert module.dict_metrics[0].firing.fired_count[j] == 0
        assert revival.dead_mask(module.dict_metrics[0].firing, 64 * 4)[j]
    else:
        assert module.dict_metrics[0].firing.fired_count[j] > 0
        assert module.crosscoder.decoder_norms()[j].sum() > 0.1


def test_resample_matching_the_living_scale_wins_a_topk_slot_where_the_initial_scale_does_not():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 8)
    fired = {}
    for match in (False, True):
        torch.manual_seed(0)
        cc = Crosscoder(2, 8, 16, activation="topk", k=2, dec_init_norm=0.1, sparse=False)
        with torch.no_grad():  # the living latents have grown well past the initial scale, as in training
            cc.W_dec.mul_(10)
            cc.W_enc.mul_(10)
        dead = torch.zeros(16, dtype=torch.bool)
        dead[5] = True
        idx = revival.resample(cc, x, dead, generator=torch.Generator().manual_seed(0), match_living=match)
        token = int(((cc.W_dec[5].reshape(-1) @ (x - cc.b_dec).reshape(64, -1).T)).argmax())
        with torch.no_grad():
            fired[match] = bool(cc(x[token:token + 1]).latents[0, idx[0]] > 0)
        if match:
            living = cc.W_dec[~dead].reshape(15, -1).norm(dim=-1).mean()
            assert cc.W_dec[5].norm().item() == pytest.approx(living.item(), rel=1e-5)
    assert fired == {False: False, True: True}


def test_resample_sets_rows_toward_high_loss_tokens_and_zeroes_their_adam_state():
    torch.manual_seed(0)
    cc = Crosscoder(2, 8, 16, activation="relu", dec_init_norm=0.1)
    opt = torch.optim.Adam(cc.parameters(), lr=1e-3)
    x = torch.randn(32, 2, 8)
    x[7] *= 50  # one token with by far the largest loss: every draw picks it first
    for _ in range(2):
        opt.zero_grad()
        out = cc(x)
        cc.loss_terms(x, out).mse.backward()
        opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 9]] = True
    before = {n: p.detach().clone() for n, p in cc.named_parameters()}
    idx = revival.resample(cc, x, dead, opt, dec_init_norm=0.1, generator=torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == [2, 9]
    v = (x[7] - cc.b_dec).reshape(-1).detach()
    first = idx[0].item()  # the first dead latent took the first draw: token 7
    cos = torch.nn.functional.cosine_similarity(cc.W_dec[first].reshape(-1), v, dim=0)
    assert cos > 0.999
    assert cc.W_dec[idx].norm(dim=(1, 2)).detach() == pytest.approx([0.1 * 2 ** 0.5] * 2, rel=1e-5)
    assert (cc.b_enc[idx] == 0).all()
    assert (cc(x[7:8]).latents[0, first] > 0).item()  # fires on the token it was drawn toward
    alive = ~dead
    torch.testing.assert_close(cc.W_dec[alive], before["W_dec"][alive], rtol=0, atol=0)  # the living untouched
    for p, dim in ((cc.W_enc, 2), (cc.W_dec, 0), (cc.b_enc, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][key]
            assert state.index_select(dim, idx).abs().max() == 0
            assert state.index_select(dim, alive.nonzero().squeeze(-1)).abs().max() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks, as DDP starts them
        cc = Crosscoder(2, 8, 16, activation="relu")
        firing = FeatureFiring(16, window=100)
        torch.manual_seed(100 + rank)  # then different data and random draws per rank
        latents = torch.zeros(60, 16)
        latents[:, :4] = 1.0  # latents 0-3 fire on both ranks
        latents[:, 4 + rank] = 1.0  # latent 4 fires on rank 0 only, latent 5 on rank 1 only
        firing.update(latents)  # 120 tokens over the two ranks: past the window of 100
        dead = revival.dead_mask(firing, 100)
        x = torch.randn(32, 2, 8)
        opt = torch.optim.Adam(cc.parameters())
        idx = revival.resample(cc, x, dead, opt)
        torch.save({"dead": dead, "idx": idx, "W_dec": cc.W_dec.detach(), "W_enc": cc.W_enc.detach()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_ddp_rank_revives_the_same_latents_the_same_way(tmp_path):
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    want = torch.ones(16, dtype=torch.bool)
    want[:6] = False  # a latent that fired on either rank is alive on both
    assert torch.equal(r0["dead"], want) and torch.equal(r1["dead"], want)
    assert torch.equal(r0["idx"], r1["idx"]) and len(r0["idx"]) == 10
    assert torch.equal(r0["W_dec"], r1["W_dec"]) and torch.equal(r0["W_enc"], r1["W_enc"])  # rank 0's draw


@pytest.mark.parametrize("activation", ["jumprelu", "paper"])
def test_resample_resets_thresholds_of_the_gated_activations(activation):
    torch.manual_seed(0)
    cc = Crosscoder(2, 8, 16, activation=activation, jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.01)
    opt = torch.optim.Adam(cc.parameters(), lr=1e-2)
    x = torch.randn(32, 2, 8)
    for _ in range(2):
        opt.zero_grad()
        out = cc(x)
        terms = cc.loss_terms(x, out)
        (terms.mse + terms.sparsity).backward()
        opt.step()
    with torch.no_grad():
        cc.log_threshold[4] = 5.0  # a threshold no token passes
    dead = torch.zeros(16, dtype=torch.bool)
    dead[4] = True
    idx = revival.resample(cc, x, dead, opt, init_threshold=0.01)
    assert idx.tolist() == [4]
    assert cc.log_threshold[4].item() == pytest.approx(math.log(0.01))
    assert opt.state[cc.log_threshold]["exp_avg"][4] == 0 and opt.state[cc.log_threshold]["exp_avg"].abs().sum() > 0
    assert torch.isfinite(cc(x).recon).all()


def _jumprelu_crosscoder(sparse: bool, S=3, D=8, F=32, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(S, D, F, activation="jumprelu", dec_init_norm=0.3, jumprelu_init_threshold=0.5,
                    jumprelu_bandwidth=0.1, sparse=sparse)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        cc.W_enc.add_(0.05 * torch.randn_like(cc.W_enc))
        cc.b_enc.normal_(0, 0.05)
        cc.log_threshold.add_(0.3 * torch.randn(F))
    return cc


@pytest.mark.parametrize("sparse", [True, False])  # topk's bar: from the kept winners, or a top-k of the dense scores
@pytest.mark.parametrize("activation", ["jumprelu", "topk", "batchtopk"])
def test_preact_loss_and_gradients_match_float64_reference(activation, sparse):
    cc = _jumprelu_crosscoder(sparse=sparse) if activation == "jumprelu" else _topk_crosscoder(sparse=sparse)
    cc.activation = activation
    B, F, coef = 48, 32, 0.5
    x = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(2))[:12]] = True
    cc.train()
    out = cc(x)
    loss = revival.preact_loss(cc, x, out, dead, coef)
    loss.backward()

    # float64 by hand: coef x mean_b sum_{i dead} relu(bar - pre_bi * n_i), n_i = sum_s ||W_dec[i, s]|| held fixed;
    # the bar: jumprelu's own threshold, topk's k-th score of the token, batchtopk's batch threshold
    W_enc = cc.W_enc.detach().double().requires_grad_()
    b_enc = cc.b_enc.detach().double().requires_grad_()
    n = cc.W_dec.detach().double().norm(dim=-1).sum(-1)
    pre = torch.einsum("bsd,sdf->bf", x.double(), W_enc) + b_enc
    if activation == "jumprelu":
        log_t = cc.log_threshold.detach().double().requires_grad_()
        bar = log_t.exp()
    elif activation == "topk":
        bar = (torch.relu(pre.detach()) * n).sort(dim=-1, descending=True).values[:, cc.k - 1:cc.k]
    else:
        bar = cc.batchtopk_threshold.double()
        assert bar > 0  # the forward set it from this batch
    ref = coef * torch.relu(bar - pre * n)[:, dead].sum() / B
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and ref.item() > 0
    grads = [(cc.W_enc.grad, W_enc.grad), (cc.b_enc.grad, b_enc.grad)]
    if activation == "jumprelu":
        grads.append((cc.log_threshold.grad, log_t.grad))
    for got, want in grads:
        assert want.abs().max() > 1e-4
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-7)
    # only the dead latents' parameters move; the decoder is not touched
    assert cc.W_enc.grad[..., ~dead].abs().max() == 0 and cc.b_enc.grad[~dead].abs().max() == 0
    assert cc.W_dec.grad is None
    assert revival.preact_loss(cc, x, out, torch.zeros(F, dtype=torch.bool), coef).item() == 0


@pytest.mark.parametrize("activation, preact_coef", [("jumprelu", 0.0), ("jumprelu", 0.01), ("topk", 0.0),
                                                     ("topk", 0.01)])
def test_latent_forced_dead_comes_back_with_the_preact_loss(activation, preact_coef):
    batches = _toy_batches()
    torch.manual_seed(0)
    l1_coef = 0.01 if activation == "jumprelu" else 0.0
    module = CrosscoderModule(2, 8, d_sae=16, activation=activation, k=3, l1_coef=l1_coef, lr=3e-3, lr_warmup_steps=0,
                              lr_decay_start=10_000, jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1,
                              threshold_lr_factor=10.0, revive_window_tokens=64 * 4, preact_coef=preact_coef, sparse=True)
    j = 5
    with torch.no_grad():  # latent 5 sits far below what it must pass on every token: no gradient reaches it
        module.crosscoder.b_enc[j] = -3.0 if activation == "jumprelu" else -1.0
    assert not _fires(module, batches, j)
    # Adam moves the bias ~lr a step, and only jumprelu's bar (its threshold, at 10x lr) comes down to meet it
    _train(module, batches, 60 if activation == "jumprelu" else 200)
    fired = module.dict_metrics[0].firing.fired_count[j]
    if preact_coef == 0:  # without it, dead for good (so the branch below could fail)
        assert fired == 0 and not _fires(module, batches, j)
    else:
        assert fired > 0 and module.crosscoder.b_enc[j] > -3.0
        assert "train/aux_loss" in module.trainer.callback_metrics


@pytest.mark.parametrize("activation, key", [("relu", "aux_coef"), ("paper", "preact_coef"), ("relu", "preact_coef"),
                                             ("jumprelu", "aux_coef")])
def test_a_revival_term_the_activation_would_ignore_is_an_error(activation, key):
    with pytest.raises(ValueError, match=rf"crosscoder\.{key}=0\.5 applies to activation .*, not '{activation}'"):
        CrosscoderModule(2, 8, d_sae=16, activation=activation, k=4, **{key: 0.5})
    CrosscoderModule(2, 8, d_sae=16, activation=activation, k=4, **{key: 0.0})  # 0, the presets' value, is fine


def test_resampling_under_fsdp_is_refused_before_training():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(ValueError, match=r"resample_every=250 with trainer=fsdp: .* set crosscoder\.resample_every=0"):
        revival.check_strategy(FSDPStrategy(), 250)
    revival.check_strategy(FSDPStrategy(), 0)  # no resampling: nothing rewrites rows
    revival.check_strategy(DDPStrategy(), 250)  # DDP keeps whole tensors on every rank
