"""Caching activations from local model snapshots through the real code path (transformers, datasets)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.cache import ensure_cached
from data.corpus import TextCorpus, heldout_documents
from data.format import from_storage, iter_samples, read_manifest
from data.snapshots import activations, check_revisions, load_snapshot, log_spaced_revisions, pythia_steps
from tests.conftest import ROOT, compose_train, write_neox_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """Two revisions of a tiny random GPT-NeoX (step1 = step0 perturbed), each with its tokenizer."""
    return write_neox_suite(tmp_path_factory.mktemp("suite"), n_revisions=2)


def configs(suite: Path, **cache):
    model = OmegaConf.create(dict(name="t", repo=str(suite), revisions=["step0", "step1"], layer=1, hook="resid_post",
                                  d_model=32, context_length=24, build=None))
    cache_cfg = OmegaConf.create(dict(n_tokens=1150, dtype="float32", drop_first=1, samples_per_shard=10,
                                      chunk_tokens=230, batch_size=8, model_dtype="float32", device="cpu") | cache)
    return model, cache_cfg


def corpus_for(suite: Path) -> TextCorpus:
    return TextCorpus("stdlib", max_docs=30, cache_dir=str(suite / "hf"))


def stored_windows(suite: Path, corpus: TextCorpus, n_train: int, n_val: int, every: int = 20) -> list:
    """The windows a cache stores, in order: n_train packed from the training documents, then n_val from the
    held-out ones (every ``every``-th document; data.corpus.heldout_documents, tested in test_live.py)."""
    from data.snapshots import load_tokenizer
    tok = load_tokenizer(str(suite), "step0")
    train = list(corpus.windows(tok, 24, max_tokens=n_train * 24, documents=heldout_documents(every, False)))
    val = list(corpus.windows(tok, 24, max_tokens=n_val * 24, documents=heldout_documents(every, True)))
    assert (len(train), len(val)) == (n_train, n_val)
    return train + val


def test_cached_vectors_equal_hidden_states_and_tokens_align(suite, tmp_path):
    model_cfg, cache_cfg = configs(suite)
    folder = ensure_cached(model_cfg, cache_cfg, corpus_for(suite), tmp_path)
    m = read_manifest(folder)
    assert [s.name for s in m.snapshots] == ["step0", "step1"] and m.tokens_per_sample == 23
    assert m.n_tokens == 50 * 23  # ceil(1150 / 23) windows, in 5 shards of 10
    windows = stored_windows(suite, corpus_for(suite), n_train=40, n_val=10)
    samples = list(iter_samples(folder))
    assert len(samples) == len(windows) == 50
    models = [load_snapshot(str(suite), r) for r in ("step0", "step1")]
    ids = torch.from_numpy(np.stack([w.tokens for w in windows])).long()
    for s, model in enumerate(models):
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][:, 1:]  # after block 1
        stored = torch.from_numpy(np.stack([a[:, s] for a, _, _ in samples]))
        torch.testing.assert_close(stored, hidden, rtol=1e-5, atol=1e-5)
    for (acts, tokens, meta), w in zip(samples, windows):  # the same corpus tokens for every snapshot
        np.testing.assert_array_equal(tokens, w.tokens[1:])
        assert meta == {"doc": w.doc, "start": w.start + 1}
    assert not np.allclose(samples[0][0][:, 0], samples[0][0][:, 1])  # the snapshots differ


def test_float16_storage_and_stats(suite, tmp_path):
    folder = ensure_cached(*configs(suite, dtype="float16", n_tokens=460), corpus_for(suite), tmp_path)
    m = read_manifest(folder)
    acts = np.concatenate([from_storage(a, "float16") for a, _, _ in iter_samples(folder)]).astype(np.float64)
    assert m.stats["step1"].mean_norm == pytest.approx(np.linalg.norm(acts[:, 1], axis=-1).mean(), rel=1e-6)
    from data.cache import bytes_per_token
    per_token, floor = bytes_per_token(folder)
    assert floor == 2 * 2 * 32
    # beyond the floor only tar headers, .npy headers and the json: a few KB per window, whatever its size
    assert 0 < (per_token - floor) * m.n_tokens < 4096 * m.n_tokens / m.tokens_per_sample


def test_same_config_reuses_and_another_config_gets_another_folder(suite, tmp_path):
    a = ensure_cached(*configs(suite, n_tokens=460), corpus_for(suite), tmp_path)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    assert ensure_cached(*configs(suite, n_tokens=460), corpus_for(suite), tmp_path) == a
    assert (a / "manifest.json").stat().st_mtime_ns == mtime
    b = ensure_cached(*configs(suite, n_tokens=460, drop_first=0), corpus_for(suite), tmp_path)
    assert b != a and read_manifest(b).tokens_per_sample == 24
    # the validation split is part of the key: another rule never reuses shards cut by the old one
    from data.cache import cache_folder
    folders = {cache_folder(*configs(suite, n_tokens=460, **split), corpus_for(suite), str(suite), tmp_path)
               for split in ({}, {"heldout_every": 20, "val_shards": 1}, {"heldout_every": 3}, {"val_shards": 2})}
    assert len(folders) == 3 and a in folders


def test_corpus_too_small_for_n_tokens_stops_before_any_model_runs(suite, tmp_path, monkeypatch):
    import data.cache
    from data.snapshots import load_tokenizer
    tiny = TextCorpus("stdlib", max_docs=2, cache_dir=str(suite / "hf"))  # doc 0 for training, doc 1 held out
    tok = load_tokenizer(str(suite), "step0")
    have = [len(list(tiny.windows(tok, 24, documents=heldout_documents(2, held_out)))) for held_out in (False, True)]
    assert 10 < have[0] < 2000 and have[1] >= 1

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran on a corpus too small for cache.n_tokens")
    with monkeypatch.context() as m:
        m.setattr(data.cache, "load_snapshot", no_model)
        m.setattr(data.cache, "activations", no_model)
        n_windows = have[0] + 11  # its whole training shards need more training-document windows than there are
        n_train = (math.ceil(n_windows / 10) - 1) * 10
        most = have[0] // 10 * 10 + min(have[1], 10)
        n_tokens = n_windows * 23
        message = (rf"^corpus too small for cache.n_tokens={n_tokens:,}: that needs {n_windows:,} windows of 24 "
                   rf"tokens \(23 stored from each\), {n_train:,} from the training documents and "
                   rf"{n_windows - n_train:,} \(cache.val_shards=1\) from the held-out ones .* holds {have[0]:,} and "
                   rf"{min(have[1], 10):,}\+?; set cache.n_tokens to at most {most * 23:,}")
        with pytest.raises(ValueError, match=message) as error:
            ensure_cached(*configs(suite, n_tokens=n_tokens, heldout_every=2), tiny, tmp_path)
        assert "\n" not in str(error.value) and "source=stdlib, split=train, max_docs=2" in str(error.value)
        assert not list(tmp_path.glob("activations/*"))  # no shard, no stray folder
    # the most the corpus holds: every training shard full, the validation shard what the held-out document gives
    folder = ensure_cached(*configs(suite, n_tokens=most * 23, heldout_every=2), tiny, tmp_path)
    m = read_manifest(folder)
    assert m.n_tokens == most * 23 and [e.samples for e in m.shards] == [10] * (have[0] // 10) + [min(have[1], 10)]
    assert not list(folder.glob("*.buffer"))


def test_validation_shards_hold_only_held_out_documents_and_stats_only_training_shards(suite, tmp_path):
    """Issue 13: no validation token's document is trained on, and the normalisation sees training shards only."""
    from data.datamodule import ActivationDataModule
    from data.snapshots import load_tokenizer
    corpus = corpus_for(suite)
    folder = ensure_cached(*configs(suite, heldout_every=3), corpus, tmp_path)  # 50 windows: 4 train shards, 1 val
    m = read_manifest(folder)
    assert m.split["val_shards"] == 1 and m.split["rule"] == "heldout_documents" and m.split["heldout_every"] == 3
    dm = ActivationDataModule(folder, batch_size=23, num_workers=0)
    dm.setup()
    assert [e.file for e in dm.val_entries] == ["shard-000004.tar"] and len(dm.train_entries) == 4

    # an independent reference: each class of documents tokenised one by one (EOS after each), end to end, with
    # the document of every token; window j of a class is reference[24 j : 24 (j + 1)], the first token dropped
    tok = load_tokenizer(str(suite), "step0")
    texts = dict(corpus.texts())
    docs_of_tokens = {}
    for held_out, entries in ((False, dm.train_entries), (True, dm.val_entries)):
        docs = [d for d in texts if (d % 3 == 2) == held_out]
        ids = [tok(texts[d], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
        reference, doc_of = np.concatenate(ids), np.repeat(docs, [len(i) for i in ids])
        samples = list(iter_samples(folder, m, shards=entries))
        seen = set()
        for j, (_, tokens, meta) in enumerate(samples):
            np.testing.assert_array_equal(tokens, reference[24 * j + 1:24 * (j + 1)])
            assert meta["doc"] == doc_of[24 * j]  # the shard's record of the window's document is right
            seen |= set(doc_of[24 * j:24 * (j + 1)].tolist())
        docs_of_tokens[held_out] = seen
    assert docs_of_tokens[True] and all(d % 3 == 2 for d in docs_of_tokens[True])
    assert not docs_of_tokens[True] & docs_of_tokens[False], "a validation document was trained on"
    val_docs = {meta["doc"] for _, _, meta in iter_samples(folder, m, shards=dm.val_entries)}
    train_docs = {meta["doc"] for _, _, meta in iter_samples(folder, m, shards=dm.train_entries)}
    assert not val_docs & train_docs

    # train_stats: over the training shards' stored values only; the scale and b_dec's mean come from them
    train = np.concatenate([a for a, _, _ in iter_samples(folder, m, shards=dm.train_entries)]).astype(np.float64)
    every = np.concatenate([a for a, _, _ in iter_samples(folder, m)]).astype(np.float64)
    for s, name in enumerate(["step0", "step1"]):
        assert m.train_stats[name].mean_norm == pytest.approx(np.linalg.norm(train[:, s], axis=-1).mean(), rel=1e-6)
        np.testing.assert_allclose(m.train_stats[name].mean, train[:, s].mean(0), rtol=1e-6, atol=1e-9)
        assert m.stats[name].mean_norm == pytest.approx(np.linalg.norm(every[:, s], axis=-1).mean(), rel=1e-6)
        assert m.stats[name].mean_norm != pytest.approx(m.train_stats[name].mean_norm, rel=1e-6)
    want = np.sqrt(32) / np.linalg.norm(train, axis=-1).mean(0)
    np.testing.assert_allclose(dm.norm_scale().numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(dm.raw_mean().numpy(), train.mean(0), rtol=1e-5, atol=1e-6)


CACHE_SCRIPT = """
import sys
from omegaconf import OmegaConf
from data.cache import ensure_cached
from data.corpus import TextCorpus, heldout_documents
model = OmegaConf.create(dict(name="t", repo=sys.argv[1], revisions=["step0", "step1"], layer=1, hook="resid_post",
                              d_model=32, context_length=24, build=None))
cache = OmegaConf.create(dict(n_tokens=23 * 200, dtype="float32", drop_first=1, samples_per_shard=10,
                              chunk_tokens=230, batch_size=1, model_dtype="float32", device="cpu"))
print(ensure_cached(model, cache, TextCorpus("stdlib", max_docs=60, cache_dir=sys.argv[1] + "/hf"), sys.argv[2]))
"""


def test_killed_cache_resumes_without_duplicate_or_missing_tokens(suite, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", CACHE_SCRIPT, str(suite), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    progress = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("activations/*/progress.json"))
        if found and len(json.loads(found[0].read_text())["shards"]) >= 3:
            progress = found[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress is not None, "the cache must be killed part-way"
    folder = progress.parent
    assert not (folder / "manifest.json").exists()
    finished = {e["file"]: (folder / e["file"]).stat().st_mtime_ns for e in json.loads(progress.read_text())["shards"]}
    # the kill can land between recording a chunk's shards and deleting its buffer: leave such a buffer behind
    (folder / "chunk-000000.buffer").write_bytes(b"left by a kill after chunk 0 was recorded")

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == folder
    for name, mtime in finished.items():  # verified, not recomputed
        assert (folder / name).stat().st_mtime_ns == mtime
    windows = stored_windows(suite, TextCorpus("stdlib", max_docs=60, cache_dir=str(suite / "hf")), 190, 10)
    stored = [t for _, t, _ in iter_samples(folder)]
    assert len(stored) == len(windows) == 200
    for tokens, w in zip(stored, windows):
        np.testing.assert_array_equal(tokens, w.tokens[1:])
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.buffer"))


def test_hook_points_match_the_model(suite):
    model = load_snapshot(str(suite), "step1")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(activations(model, ids, 1, "resid_post"), hs[2])
    # GPT-NeoX's parallel residual: block output = input + attention(ln1(x)) + mlp(ln2(x))
    both = activations(model, ids, 1, "attn_out") + activations(model, ids, 1, "mlp_out")
    torch.testing.assert_close(both, hs[2] - hs[1], rtol=1e-4, atol=1e-5)


def test_clear_errors_before_any_work(suite, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model folder for revision\(s\) \['step7'\] \(found: \['step0', 'step1'\]\)"):
        check_revisions(str(suite), ["step0", "step7"])
    with pytest.raises(ValueError, match=r"\['step1500'\] are not public checkpoints of EleutherAI/pythia-160m"):
        check_revisions("EleutherAI/pythia-160m", ["step1000", "step1500"])
    with pytest.raises(ValueError, match="'latest' is not a revision name"):
        check_revisions("EleutherAI/pythia-160m", ["latest"])
    model_cfg, cache_cfg = configs(suite)
    model_cfg.revisions = ["step0", "step9"]
    with pytest.raises(FileNotFoundError, match="step9"):
        ensure_cached(model_cfg, cache_cfg, corpus_for(suite), tmp_path)
    assert not (tmp_path / "activations").exists()
    model = load_snapshot(str(suite), "step0")
    with pytest.raises(ValueError, match="model.hook: 'resid_pre'"):
        activations(model, torch.zeros(1, 4, dtype=torch.long), 1, "resid_pre")
    with pytest.raises(ValueError, match="model.layer: 5 is out of range"):
        activations(model, torch.zeros(1, 4, dtype=torch.long), 5, "resid_post")


def test_pythia_configs_resolve_offline(tmp_path):
    assert len(pythia_steps()) == 154 and pythia_steps()[-1] == 143000
    for name, d_model, layer in [("pythia70m", 512, 3), ("pythia160m", 768, 6), ("pythia410m", 1024, 12),
                                 ("pythia1b", 2048, 8), ("pythia6.9b", 4096, 16)]:
        cfg = compose_train([f"model={name}"], tmp_path)
        assert (cfg.model.d_model, cfg.model.layer, cfg.model.context_length) == (d_model, layer, 2048)
        assert list(cfg.model.revisions) == log_spaced_revisions(32) and len(cfg.model.revisions) == 32
        assert cfg.model.revisions[0] == "step0" and cfg.model.revisions[-1] == "step143000"
        check_revisions(cfg.model.repo, list(cfg.model.revisions))  # no download: the schedule is known
    assert cfg.model.repo == "EleutherAI/pythia-6.9b"


def test_cache_states_its_disk_need_and_stops_when_the_disk_is_smaller(suite, tmp_path, monkeypatch, capsys):
    import data.cache
    from data.cache import ActivationCache, cache_folder
    from data.format import FormatError
    model_cfg, cache_cfg = configs(suite)
    corpus = corpus_for(suite)
    folder = cache_folder(model_cfg, cache_cfg, corpus, str(suite), tmp_path)
    need = ActivationCache(folder, str(suite), model_cfg, cache_cfg, corpus).disk_bytes()
    # 50 windows of 23 stored tokens x 2 snapshots x 32 x 4 bytes, 2 KiB of headers each; a chunk of 10 windows;
    # 50 x 24 tokenised ids of 4 bytes
    assert need == {"shards": 50 * (23 * 2 * 32 * 4 + 2048), "chunk_buffer": 10 * 23 * 2 * 32 * 4,
                    "tokens": 50 * 24 * 4, "total": 50 * (23 * 2 * 32 * 4 + 2048) + 10 * 23 * 2 * 32 * 4 + 50 * 24 * 4}
    monkeypatch.setattr(data.cache, "free_bytes", lambda folder: need["total"] - 1)
    with pytest.raises(FormatError, match=r"caching needs 0\.5 MB more on disk, only 0\.5 MB free; train with data=live"):
        ensure_cached(model_cfg, cache_cfg, corpus, tmp_path)
    assert "needs 0.5 MB on disk" in capsys.readouterr().out
    assert not folder.exists() or not list(folder.glob("*.tar"))
    monkeypatch.setattr(data.cache, "free_bytes", lambda folder: need["total"])
    assert read_manifest(ensure_cached(model_cfg, cache_cfg, corpus, tmp_path)).n_tokens == 1150
