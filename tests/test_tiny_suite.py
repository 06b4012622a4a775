"""The offline mini-Pythia suite, built small: schedule, Hugging Face folders, reuse, loss curve."""

from __future__ import annotations

import json

import torch

from analysis.run_files import parse_loss_curve
from data.snapshots import check_revisions, load_snapshot, load_tokenizer
from data.tiny_suite import build_suite, checkpoint_schedule

SMALL = dict(d_model=32, n_layers=2, n_heads=2, context_length=32, vocab_size=300, batch_size=4, max_steps=12,
             warmup_steps=2, log_until=4, every=4, max_docs=20)


def test_schedule_is_pythia_shaped():
    assert checkpoint_schedule(1024) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 640, 768, 896, 1024]
    assert checkpoint_schedule(10, log_until=4, every=4) == [0, 1, 2, 4, 8, 10]


def test_small_suite_builds_loads_offline_and_is_reused(tmp_path):
    folder = build_suite(tmp_path, **SMALL)
    suite = json.loads((folder / "suite.json").read_text())
    assert suite["revisions"] == ["step0", "step1", "step2", "step4", "step8", "step12"]
    check_revisions(str(folder), suite["revisions"])
    first, last = (load_snapshot(str(folder), r) for r in ("step0", "step12"))
    assert first.config.hidden_size == 32 and first.config.num_hidden_layers == 2
    assert not torch.equal(first.gpt_neox.layers[0].mlp.dense_h_to_4h.weight, last.gpt_neox.layers[0].mlp.dense_h_to_4h.weight)
    tokenizer = load_tokenizer(str(folder), "step12")
    assert tokenizer.decode(tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    steps, losses = parse_loss_curve(json.loads((folder / "loss_curve.json").read_text()))
    assert steps == [0, 1, 2, 4, 8, 12] and losses[-1] < losses[0]  # it learned
    assert (folder / "loss_curve.png").stat().st_size > 10_000

    mtime = (folder / "suite.json").stat().st_mtime_ns
    assert build_suite(tmp_path, **SMALL) == folder and (folder / "suite.json").stat().st_mtime_ns == mtime
    assert build_suite(tmp_path, **{**SMALL, "seed": 1}) != folder  # another config, another folder


def test_duplicated_passages():
    from data.tiny_suite import duplicate_passages
    windows = torch.arange(8 * 12).reshape(8, 12)
    out = duplicate_passages(windows, 0.5, seed=3)
    copied = (out[:, 6:] == out[:, :6]).all(1)
    assert copied.sum() == 4 and torch.equal(out[:, :6], windows[:, :6])  # half: the first half twice
    assert torch.equal(out[~copied], windows[~copied])  # the rest untouched
    assert torch.equal(duplicate_passages(windows, 0.5, seed=3), out)  # deterministic
    assert torch.equal(duplicate_passages(windows, 0.0, seed=3), windows)
    by5 = duplicate_passages(windows, 1.0, seed=0, period=5)
    assert torch.equal(by5, windows[:, :5].repeat(1, 3)[:, :12])  # a period that does not divide T
