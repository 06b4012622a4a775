"""Caching activations from local model snapshots through the real code path (transformers, datasets)."""

from __future__ import annotations

import json
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
from data.corpus import TextCorpus
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


def test_cached_vectors_equal_hidden_states_and_tokens_align(suite, tmp_path):
    model_cfg, cache_cfg = configs(suite)
    folder = ensure_cached(model_cfg, cache_cfg, corpus_for(suite), tmp_path)
    m = read_manifest(folder)
    assert [s.name for s in m.snapshots] == ["step0", "step1"] and m.tokens_per_sample == 23
    assert m.n_tokens == 50 * 23  # ceil(1150 / 23) windows, in 5 shards of 10
    from data.snapshots import load_tokenizer
    windows = list(corpus_for(suite).windows(load_tokenizer(str(suite), "step0"), 24, max_tokens=50 * 24))
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
    a = ensure_cached(*configs(suite, n_tokens=230), corpus_for(suite), tmp_path)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    assert ensure_cached(*configs(suite, n_tokens=230), corpus_for(suite), tmp_path) == a
    assert (a / "manifest.json").stat().st_mtime_ns == mtime
    b = ensure_cached(*configs(suite, n_tokens=230, drop_first=0), corpus_for(suite), tmp_path)
    assert b != a and read_manifest(b).tokens_per_sample == 24


def test_corpus_too_small_for_n_tokens_stops_before_any_model_runs(suite, tmp_path, monkeypatch):
    import data.cache
    from data.snapshots import load_tokenizer
    tiny = TextCorpus("stdlib", max_docs=1, cache_dir=str(suite / "hf"))
    have = len(list(tiny.windows(load_tokenizer(str(suite), "step0"), 24)))  # 24-token windows the corpus holds
    assert 10 < have < 2000

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran on a corpus too small for cache.n_tokens")
    with monkeypatch.context() as m:
        m.setattr(data.cache, "load_snapshot", no_model)
        m.setattr(data.cache, "activations", no_model)
        n_tokens = have * 23 + 1  # one window more than the corpus holds (23 tokens stored per window)
        message = (rf"^corpus too small for cache.n_tokens={n_tokens:,}: that needs {(have + 1) * 24:,} corpus "
                   rf"tokens .* holds {have * 24:,} \({have:,} windows\); set cache.n_tokens to at most {have * 23:,}")
        with pytest.raises(ValueError, match=message) as error:
            ensure_cached(*configs(suite, n_tokens=n_tokens), tiny, tmp_path)
        assert "\n" not in str(error.value) and "source=stdlib, split=train, max_docs=1" in str(error.value)
        assert not list(tmp_path.glob("activations/*"))  # no shard, no stray folder
    # exactly as many tokens as the corpus holds: every shard full but the last, which holds the rest
    folder = ensure_cached(*configs(suite, n_tokens=have * 23), tiny, tmp_path)
    m = read_manifest(folder)
    assert m.n_tokens == have * 23 and [e.samples for e in m.shards] == [10] * (have // 10) + [have % 10] * (have % 10 > 0)
    assert not list(folder.glob("*.buffer"))


CACHE_SCRIPT = """
import sys
from omegaconf import OmegaConf
from data.cache import ensure_cached
from data.corpus import TextCorpus
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

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == folder
    for name, mtime in finished.items():  # verified, not recomputed
        assert (folder / name).stat().st_mtime_ns == mtime
    from data.snapshots import load_tokenizer
    windows = list(TextCorpus("stdlib", max_docs=60, cache_dir=str(suite / "hf")).windows(
        load_tokenizer(str(suite), "step0"), 24, max_tokens=200 * 24))
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
