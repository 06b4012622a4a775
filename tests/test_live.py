"""Live activations (data/live.py): the same vectors as the cache, held-out documents, exact resume, DDP shares,
and train.py end to end with no activation shard written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.cache import ensure_cached
from data.corpus import TextCorpus, heldout_documents
from data.format import from_storage, iter_samples
from data.live import LiveActivationDataModule, SnapshotModels
from data.snapshots import load_snapshot, load_tokenizer
from tests.conftest import ROOT, write_neox_suite
from tests.test_ddp import FINGERPRINT, RecordRank
from tests.test_resume import kill_at_first_checkpoint, run_train

CTX = 24  # tokens per window; 23 enter the stream (drop_first=1)


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return write_neox_suite(tmp_path_factory.mktemp("suite"), n_revisions=2)


def model_cfg(suite: Path):
    return OmegaConf.create(dict(name="t", repo=str(suite), revisions=["step0", "step1"], layer=1,
                                 hook="resid_post", d_model=32, context_length=CTX, build=None))


def corpus_for(suite: Path) -> TextCorpus:
    return TextCorpus("stdlib", max_docs=30, cache_dir=str(suite / "hf"))


def live(suite: Path, **kw) -> LiveActivationDataModule:
    args = dict(batch_size=23, block_tokens=23, heldout_every=5, val_tokens=230, norm_tokens=230,
                forward_batch=7, device="cpu")
    dm = LiveActivationDataModule(model_cfg(suite), corpus_for(suite), cache_dir=str(suite), **(args | kw))
    dm.setup()
    return dm


def take(it, n: int) -> torch.Tensor:
    return torch.stack([b for _, b in zip(range(n), it)])


def test_live_vectors_equal_the_cache_within_its_rounding(suite, tmp_path):
    cache_cfg = OmegaConf.create(dict(n_tokens=40 * 23, dtype="float16", drop_first=1, samples_per_shard=10,
                                      chunk_tokens=230, batch_size=8, model_dtype="float32", device="cpu"))
    folder = ensure_cached(model_cfg(suite), cache_cfg, corpus_for(suite), tmp_path)
    samples = list(iter_samples(folder))
    tok = load_tokenizer(str(suite), "step0")  # the cache: 3 shards of training documents, then 1 of held-out ones
    windows = [w for held_out, n in ((False, 30), (True, 10)) for w in
               corpus_for(suite).windows(tok, CTX, max_tokens=n * CTX, documents=heldout_documents(20, held_out))]
    models = SnapshotModels(str(suite), ["step0", "step1"], 1, "resid_post", 32, forward_batch=5)
    acts = models.run(torch.from_numpy(np.stack([w.tokens for w in windows])).long(), 1, torch.float32)
    assert acts.shape == (40, 23, 2, 32)
    cached = torch.from_numpy(np.stack([from_storage(a, "float16") for a, _, _ in samples]))
    # float16 keeps 11 significant bits: the cache is the live vector rounded, up to one float16 step
    torch.testing.assert_close(cached, acts, rtol=2 ** -10, atol=1e-4)
    assert not torch.equal(acts[:, :, 0], acts[:, :, 1])  # the snapshots differ, and each is in its own slot
    rotated = SnapshotModels(str(suite), ["step0", "step1"], 1, "resid_post", 32, placement="rotate", forward_batch=5)
    torch.testing.assert_close(rotated.run(torch.from_numpy(np.stack([w.tokens for w in windows[:6]])).long(), 1,
                                           torch.float32), acts[:6], rtol=0, atol=0)
    assert rotated.bytes == models.bytes < sum(p.numel() * 4 for p in load_snapshot(str(suite), "step0").parameters()) * 2
    for (_, tokens, _), w in zip(samples, windows):
        assert np.array_equal(tokens, w.tokens[1:])


def test_training_and_validation_never_share_a_document(suite):
    tok = load_tokenizer(str(suite), "step0")
    corpus = corpus_for(suite)
    texts = dict(corpus.texts())
    for held_out in (False, True):
        docs = [d for d in texts if heldout_documents(5, held_out)(d)]
        stream = np.concatenate(list(w.tokens for w in corpus.windows(tok, CTX, documents=heldout_documents(5, held_out))))
        # an independent reference: the chosen documents tokenised one by one, EOS after each, end to end
        reference = np.concatenate([tok(texts[d], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                    for d in docs])
        assert len(stream) == len(reference) // CTX * CTX
        assert np.array_equal(stream, reference[:len(stream)])
    assert {d for d in texts if heldout_documents(5, True)(d)} == {4, 9, 14, 19, 24, 29}
    with pytest.raises(ValueError, match="data.heldout_every"):
        heldout_documents(1, True)


def test_stream_is_the_training_windows_and_validation_the_held_out_ones(suite):
    dm = live(suite)  # block = batch = one window: the stored order, one window per batch
    tok = load_tokenizer(str(suite), "step0")
    train = [w.tokens for w in corpus_for(suite).windows(tok, CTX, documents=heldout_documents(5, False))]
    val = [w.tokens for w in corpus_for(suite).windows(tok, CTX, documents=heldout_documents(5, True))][:10]
    expect = dm.models.run(torch.from_numpy(np.stack(train[:12])).long(), 1, torch.float32)
    torch.testing.assert_close(take(dm.train_batches(), 12), expect, rtol=0, atol=0)
    got_val = torch.cat(list(dm.val_batches()))
    torch.testing.assert_close(got_val, dm.models.run(torch.from_numpy(np.stack(val)).long(), 1, torch.float32).flatten(0, 1))
    torch.testing.assert_close(torch.cat(list(dm.val_batches())), got_val, rtol=0, atol=0)  # kept, the same
    # statistics: the first norm_tokens training tokens, float64, exactly what the cached path defines
    first = dm.models.run(torch.from_numpy(np.stack(train[:10])).long(), 1, torch.float32).flatten(0, 1).double()
    torch.testing.assert_close(dm.mean_norm, first.norm(dim=-1).mean(0))
    torch.testing.assert_close(dm.raw_mean().double(), first.mean(0), rtol=1e-6, atol=1e-7)
    assert dm.norm_scale().shape == (2,) and dm.stats_tokens == 230


def test_shuffled_blocks_hold_each_token_once_and_resume_exactly(suite):
    dm = live(suite, batch_size=16, block_tokens=64)  # blocks of 64 tokens cut across windows of 23
    plain = live(suite, batch_size=16, block_tokens=16)
    n = 40  # 10 blocks
    full = take(dm.train_batches(), n)
    stored = take(plain.train_batches(), n)
    for b in range(0, n, 4):  # each block is a permutation of 64 consecutive stream tokens
        block, ref = full[b:b + 4].flatten(0, 1), stored[b:b + 4].flatten(0, 1)
        assert not torch.equal(block, ref)
        key = lambda x: x[:, 0, 0].sort().values
        torch.testing.assert_close(key(block), key(ref), rtol=0, atol=0)
    for start in [1, 3, 4, 5, 17, 39]:
        torch.testing.assert_close(take(dm.train_batches(start), n - start), full[start:], rtol=0, atol=0,
                                   msg=lambda m: f"resumed after {start} batches: {m}")


def test_ranks_read_distinct_windows_that_together_are_the_stream(suite, monkeypatch):
    import data.live
    single = take(live(suite).train_batches(), 12)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(data.live, "_rank_info", lambda r=rank: (r, 2))
        shares.append(take(live(suite).train_batches(), 6))
    torch.testing.assert_close(shares[0], single[0::2], rtol=0, atol=0)
    torch.testing.assert_close(shares[1], single[1::2], rtol=0, atol=0)


def test_bad_settings_are_named(suite):
    with pytest.raises(ValueError, match="data.snapshots"):
        live(suite, snapshots=["step7"])
    with pytest.raises(ValueError, match="data.placement"):
        live(suite, placement="somewhere")
    with pytest.raises(ValueError, match="data.buffer_dtype"):
        live(suite, buffer_dtype="float8")
    bad = model_cfg(suite)
    bad.d_model = 48
    with pytest.raises(Exception, match="hidden size 32, but model.d_model is 48"):
        LiveActivationDataModule(bad, corpus_for(suite), cache_dir=str(suite), device="cpu").setup()


LIVE_ARGS = ["data=live", "model.revisions=[step0,step1]", "model.layer=1", "model.d_model=32",
             f"model.context_length={CTX}", "corpus.max_docs=30", "data.batch_size=64", "data.block_tokens=256",
             "data.val_tokens=460", "data.norm_tokens=460", "data.forward_batch=16", "crosscoder.d_sae=32",
             "trainer.max_steps=60", "trainer.val_check_interval=20", "callbacks.checkpoint.every_n_train_steps=10",
             "callbacks.progress_bar.refresh_rate=0"]


def test_paper_tiny_live_end_to_end_writes_no_activations_resumes_after_sigkill_and_analyses(suite, tmp_path):
    """experiment=paper_tiny (live by default) through train.py: run folder, no shard, SIGKILL resume, analyze.py."""
    cache = tmp_path / "cache"
    common = ["experiment=paper_tiny", *LIVE_ARGS[1:], f"model.repo={suite}", f"paths.cache_dir={cache}",
              f"corpus.cache_dir={suite / 'hf'}"]
    full = run_train([*common, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "full"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 60 and -1 < metrics["val/explained_variance"] <= 1  # 60 steps: a smoke run
    assert (run / "crosscoder.safetensors").is_file() and list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not cache.exists() or not list(cache.rglob("*.tar")), "a live run writes no activation shard"
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.repo == str(suite) and cfg.crosscoder.activation == "paper"
    assert cfg.data._target_ == "data.live.LiveActivationDataModule"
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"run={run}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "analysis").is_dir()

    killed = tmp_path / "killed"
    last = kill_at_first_checkpoint(run_train([*common, f"hydra.run.dir={killed}"], tmp_path, wait=False), killed)
    assert 0 < torch.load(last, map_location="cpu", weights_only=False)["global_step"] < 60
    resumed = run_train([*common, f"hydra.run.dir={killed}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((killed / "metrics.json").read_text())
    for key in ["val/explained_variance", "val/l0", "val/mse"]:
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    wa = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(last, weights_only=False)["state_dict"]
    torch.testing.assert_close(wb["crosscoders.0.W_dec"], wa["crosscoders.0.W_dec"], rtol=1e-5, atol=1e-7)


class RecordLiveRank(RecordRank):
    """RecordRank for this suite's width (32): the first 16 values of snapshot 0 fingerprint a token."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx < self.batches:
            self.seen.append((batch[:, 0, :len(FINGERPRINT)].double() @ FINGERPRINT).cpu().numpy())


@pytest.mark.slow
def test_ddp_ranks_read_distinct_windows_through_train_py(suite, tmp_path):
    """Two gloo processes: each rank's batches are the single process's alternate windows, weights agree."""
    common = [*LIVE_ARGS, f"model.repo={suite}", f"paths.cache_dir={tmp_path / 'cache'}",
              f"corpus.cache_dir={suite / 'hf'}", "data.batch_size=23", "data.block_tokens=23", "logger=none",
              "trainer.val_check_interval=10", "+callbacks.record._target_=tests.test_live.RecordLiveRank"]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    for d in (ddp_dir, single_dir):
        d.mkdir()
    for args in ([f"hydra.run.dir={ddp_dir}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.max_steps=10", "+callbacks.record.batches=10", f"+callbacks.record.out={ddp_dir}"],
                 [f"hydra.run.dir={single_dir}", "trainer.max_steps=20", "+callbacks.record.batches=20",
                  f"+callbacks.record.out={single_dir}"]):
        out = run_train([*common, *args], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_array_equal(np.load(ddp_dir / "rank0_W_dec.npy"), np.load(ddp_dir / "rank1_W_dec.npy"))
    single = np.load(single_dir / "rank0_tokens.npy").reshape(20, 23)  # one window per batch
    for rank in (0, 1):
        seen = np.load(ddp_dir / f"rank{rank}_tokens.npy").reshape(10, 23)
        np.testing.assert_allclose(seen, single[rank::2], rtol=1e-6)
