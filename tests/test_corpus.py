"""Corpus windows: Pythia-style packing, deterministic, and (doc, start) pointing at the source text."""

from __future__ import annotations

import numpy as np
import pytest

from data.corpus import TextCorpus, stdlib_files


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data.tiny_suite import train_tokenizer
    corpus = TextCorpus("stdlib", max_docs=15, cache_dir=str(tmp_path_factory.mktemp("hf")))
    return train_tokenizer([t for _, t in corpus.texts()], vocab_size=300)


def test_windows_pack_documents_with_eos_and_point_at_their_source(tokenizer, tmp_path):
    corpus = TextCorpus("stdlib", max_docs=12, cache_dir=str(tmp_path))
    texts = dict(corpus.texts())
    windows = list(corpus.windows(tokenizer, 64))
    stream = np.concatenate([tokenizer(texts[d], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                             for d in sorted(texts)])
    assert len(windows) == len(stream) // 64 and all(len(w.tokens) == 64 for w in windows)
    np.testing.assert_array_equal(np.concatenate([w.tokens for w in windows]), stream[:len(windows) * 64])
    ids = {d: tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d, t in texts.items()}
    for w in windows:  # the window's first token is token `start` of document `doc`
        doc_ids = ids[w.doc]  # tokenised once a document (per window, this test took 107 s)
        assert doc_ids[w.start] == w.tokens[0]
        n = min(64, len(doc_ids) - w.start)
        np.testing.assert_array_equal(w.tokens[:n], doc_ids[w.start:w.start + n])
    assert len(list(corpus.windows(tokenizer, 64, max_tokens=200))) == 4  # stops after the window crossing 200


def test_same_seed_same_windows_other_seed_other_order(tokenizer, tmp_path):
    a = [w.tokens for w in TextCorpus("stdlib", seed=0, max_docs=8, cache_dir=str(tmp_path)).windows(tokenizer, 32)]
    b = [w.tokens for w in TextCorpus("stdlib", seed=0, max_docs=8, cache_dir=str(tmp_path)).windows(tokenizer, 32)]
    c = [w.tokens for w in TextCorpus("stdlib", seed=1, max_docs=8, cache_dir=str(tmp_path)).windows(tokenizer, 32)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_stdlib_split_is_held_out_and_about_12_mb():
    train, val = set(stdlib_files("train")), set(stdlib_files("validation"))
    assert train and val and not train & val
    size = sum(p.stat().st_size for p in train | val) / 1e6
    assert 5 < size < 40 and len(val) < 0.15 * len(train | val)
    with pytest.raises(ValueError, match="corpus.split: 'test'"):
        stdlib_files("test")


def test_a_missing_text_column_is_named(tmp_path):
    with pytest.raises(KeyError, match="corpus.text_column: 'content' is not a column of stdlib"):
        next(TextCorpus("stdlib", text_column="content", max_docs=2, cache_dir=str(tmp_path)).texts())
