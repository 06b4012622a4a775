"""Attribution across snapshots: the tasks' prompts, the splice, attribution patching and integrated gradients
against independent computations in float64, the causal check's patching, and analyze.py attribution=<task>."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from analysis.attribution import (
    Site,
    attribute_snapshot,
    causal_check,
    change_size,
    feature_attribution,
    matched_controls,
    mean_gradient,
    model_site,
)
from analysis.run_files import load_run
from analysis.splice import decode_at, hook_activations, logits_with, snapshot_code
from analysis.tasks import IOI, SVA, Induction, TaskPrompts, answer_mask, logit_diff, split_prompts, take
from crosscoder.model import Crosscoder
from data.format import read_manifest
from data.snapshots import load_snapshot, load_tokenizer
from tests.conftest import write_neox_suite

REVISIONS = ["step0", "step1", "step2"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return write_neox_suite(tmp_path_factory.mktemp("suite"), n_revisions=3)


@pytest.fixture(scope="module")
def dataset(suite, tmp_path_factory) -> Path:
    """The suite's layer-1 residual stream cached through the real path (the manifest records repo and hook)."""
    from data.cache import ensure_cached
    from data.corpus import TextCorpus
    model = OmegaConf.create(dict(name="t", repo=str(suite), revisions=REVISIONS, layer=1, hook="resid_post",
                                  d_model=32, context_length=24, build=None))
    cache = OmegaConf.create(dict(n_tokens=920, dtype="float32", drop_first=1, samples_per_shard=20,
                                  chunk_tokens=920, batch_size=8, model_dtype="float32", device="cpu"))
    return ensure_cached(model, cache, TextCorpus("stdlib", max_docs=30, cache_dir=str(suite / "hf")),
                         tmp_path_factory.mktemp("cache"))


def make_crosscoder(activation: str, manifest, F: int = 48, seed: int = 0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(3, 32, F, activation=activation, k=6, snapshot_names=REVISIONS, jumprelu_init_threshold=0.05,
                    jumprelu_bandwidth=2.0, dec_init_norm=0.3)
    with torch.no_grad():
        cc.scale.copy_(torch.tensor([32 ** 0.5 / manifest.stats[n].mean_norm for n in REVISIONS]))
        cc.W_dec.mul_(torch.rand(F, 3, 1) + 0.5)  # snapshots with different decoders (and gates, for "paper")
        cc.b_enc.fill_(0.05)
    return cc.eval().requires_grad_(False)


def write_run(folder: Path, cc: Crosscoder, dataset: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cc.save(folder)
    OmegaConf.save(OmegaConf.create({"data": {"path": str(dataset), "val_shards": 1}}), folder / "config.yaml")
    return folder


class Spliced:
    """Everything at one snapshot, in float64: prompts, hook outputs and codes of clean and corrupted runs."""

    def __init__(self, suite: Path, dataset: Path, activation: str, s: int = 2, n_prompts: int = 6):
        manifest = read_manifest(dataset)
        self.site = Site(str(suite), 1, "resid_post", 1)
        self.prompts = Induction(n_prompts=n_prompts, seq_len=5).prompts(load_tokenizer(str(suite), "step0"))
        models = [load_snapshot(str(suite), r, dtype=torch.float64) for r in REVISIONS]
        acts = {k: torch.stack([hook_activations(m, ids, 1, "resid_post", 4)[:, 1:] for m in models], dim=2)
                for k, ids in (("clean", self.prompts.clean), ("corr", self.prompts.corrupted))}
        self.cc = make_crosscoder(activation, manifest).double()
        self.s, self.model = s, models[s].requires_grad_(False)
        self.h_clean, self.h_corr = acts["clean"][:, :, s], acts["corr"][:, :, s]
        self.f_clean, self.f_corr = snapshot_code(self.cc, acts["clean"], s), snapshot_code(self.cc, acts["corr"], s)

    def metric(self, h: torch.Tensor) -> torch.Tensor:
        site = self.site
        return logit_diff(logits_with(self.model, self.prompts.clean, site.layer, site.hook, site.drop_first, h),
                          self.prompts).mean()


# ---- tasks -------------------------------------------------------------------------------------------------------
def test_logit_diff_reads_each_prompts_answer_position():
    from analysis.tasks import TaskPrompts
    logits = torch.randn(3, 5, 7)
    p = TaskPrompts(torch.zeros(3, 5), torch.zeros(3, 5), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]),
                    torch.tensor([4, 2, 0]), [])
    want = [logits[0, 4, 1] - logits[0, 4, 4], logits[1, 2, 2] - logits[1, 2, 5], logits[2, 0, 3] - logits[2, 0, 6]]
    torch.testing.assert_close(logit_diff(logits, p), torch.stack(want))
    torch.testing.assert_close(logit_diff(logits[1:], p, slice(1, None)), torch.stack(want[1:]))


def test_induction_prompts_repeat_and_differ_in_one_token(suite):
    tok = load_tokenizer(str(suite), "step0")
    L = 7
    p = Induction(n_prompts=20, seq_len=L, seed=3).prompts(tok)
    assert p.clean.shape == p.corrupted.shape == (20, 2 * L)
    assert (p.clean[:, 0] == tok.eos_token_id).all() and (p.position == 2 * L - 1).all()
    first, second = p.clean[:, 1:L + 1], p.clean[:, L + 1:]
    assert torch.equal(second, first[:, :-1])  # the second copy repeats the first up to its last token
    differ = (p.clean != p.corrupted).nonzero()
    assert differ[:, 0].tolist() == list(range(20)) and (differ[:, 1] == L).all()  # only the first copy's last token
    assert torch.equal(p.answer, p.clean[:, L]) and torch.equal(p.wrong, p.corrupted[:, L])
    assert all(len(set(row.tolist())) == L for row in first)  # distinct tokens: one right continuation
    assert not set(p.clean[:, 1:].flatten().tolist()) & set(tok.all_special_ids)
    assert "\ufffd" not in "".join(tok.decode(t) for t in p.clean[:, 1:].flatten())
    again = Induction(n_prompts=20, seq_len=L, seed=3).prompts(tok)
    assert torch.equal(again.clean, p.clean)


def test_induction_on_held_out_text_passages(suite):
    from data.corpus import TextCorpus
    tok = load_tokenizer(str(suite), "step0")
    corpus = TextCorpus("stdlib", split="validation", max_docs=20, cache_dir=str(suite / "hf"))
    task = Induction(n_prompts=12, seq_len=8, source="text", corpus=corpus)
    assert task.name == "induction_text"  # its own output folder beside the random-token task's
    p = task.prompts(tok)
    passages = {tuple(w.tokens.tolist()) for w in corpus.windows(tok, 8)}
    for i in range(12):
        r = p.clean[i, 1:9].tolist()
        assert tuple(r) in passages and p.clean[i, 9:].tolist() == r[:-1]  # a real passage, then its repeat
        assert r.count(r[-1]) == 1 and p.wrong[i] not in r  # one right continuation, one wrong one
    assert ((p.clean != p.corrupted).sum(1) == 1).all()
    with pytest.raises(ValueError, match="attribution.task.source: 'texts'"):
        Induction(source="texts").prompts(tok)
    with pytest.raises(ValueError, match="attribution.task.corpus"):
        Induction(source="text").prompts(tok)


@pytest.fixture(scope="module")
def english_tokenizer():
    """A byte-level BPE trained on sentences built from the tasks' own word lists, so names, nouns and verbs
    are single tokens as they are for Pythia."""
    from analysis import tasks
    from data.tiny_suite import train_tokenizer
    words = (tasks.NAMES + tasks.PLACES + tasks.OBJECTS + tasks.ATTRACTORS + [w for pair in tasks.NOUNS for w in pair]
             + [v.strip() for pair in tasks.VERBS for v in pair])
    text = [" ".join(words) + ". " + t for t in tasks.IOI_TEMPLATES + tasks.SVA_TEMPLATES] * 30
    return train_tokenizer(text, vocab_size=600)


@pytest.mark.parametrize("task_cls", [IOI, SVA])
def test_template_tasks_flip_one_token_and_balance_answers(english_tokenizer, task_cls):
    tok = english_tokenizer
    p = task_cls(n_prompts=40, seed=1).prompts(tok)
    assert len(p.clean) >= 30  # prompts whose pair tokenises to different lengths are dropped, not many
    differ = p.clean != p.corrupted
    assert (differ.sum(1) == 1).all()  # the repeated name / the subject's number, nothing else
    assert (p.answer != p.wrong).all()
    answers = [tok.decode([a]) for a in p.answer]
    if task_cls is IOI:
        for i in range(len(p.clean)):  # the answer is the name that the clean prompt does not repeat
            text = tok.decode(p.clean[i, 1:p.position[i] + 1])
            assert text.count(answers[i].strip()) == 1 and text.count(tok.decode([p.wrong[i]]).strip()) == 2
    else:
        assert set(answers) <= {" is", " are", " was", " were", " has", " have"}
        singular_first = sum(a in (" is", " was", " has") for a in answers)
        assert 0.25 < singular_first / len(answers) < 0.75
    for i in range(len(p.clean)):  # right padding sits after the answer position only
        assert (p.clean[i, p.position[i] + 1:] == tok.eos_token_id).all()


def test_english_tasks_refuse_a_code_tokenizer(suite):
    tok = load_tokenizer(str(suite), "step0")  # 400 BPE tokens trained on Python code
    with pytest.raises(ValueError, match="'ioi'.*single tokens.*English model"):
        IOI().prompts(tok)
    with pytest.raises(ValueError, match="'sva'.*English model"):
        SVA().prompts(tok)


# ---- the splice and the attributions ------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["resid_post", "mlp_out", "attn_out"])
def test_replacing_the_hook_output_by_itself_changes_nothing(suite, hook):
    model = load_snapshot(str(suite), "step1")
    ids = Induction(n_prompts=3, seq_len=6).prompts(load_tokenizer(str(suite), "step1")).clean
    own = hook_activations(model, ids, 1, hook, 8)
    with torch.no_grad():
        torch.testing.assert_close(logits_with(model, ids, 1, hook, 2, own[:, 2:]), model(input_ids=ids).logits)
        moved = logits_with(model, ids, 1, hook, 2, own[:, 2:] + 1.0)
    assert not torch.allclose(moved, model(input_ids=ids).logits)  # the hook does reach the output


@pytest.mark.parametrize("activation", ["relu", "paper"])
def test_attributions_match_independent_float64_computations(suite, dataset, activation):
    t = Spliced(suite, dataset, activation)
    if activation == "paper":  # per-snapshot codes: the gates differ between snapshots
        other = snapshot_code(t.cc, torch.stack([t.h_clean] * 3, dim=2), 0)
        assert not torch.equal((other > 0), (snapshot_code(t.cc, torch.stack([t.h_clean] * 3, dim=2), 2) > 0))
    delta = t.f_clean - t.f_corr
    assert delta.abs().sum() > 0

    # attribution patching is the first-order change of the metric: patch a set of features by a small step
    grad = mean_gradient(t.model, t.prompts, t.site, t.h_clean, t.h_corr, [1.0], batch_size=4)
    atp = feature_attribution(t.cc, t.s, delta, grad, batch_size=4)
    top = np.argsort(-np.abs(atp))[:5]
    eps = 1e-5
    step = eps * delta[..., top] @ (t.cc.W_dec[top, t.s] / t.cc.scale[t.s])
    fd = (t.metric(t.h_clean + step) - t.metric(t.h_clean - step)).item() / (2 * eps)
    assert fd == pytest.approx(atp[top].sum(), rel=1e-6)
    assert np.abs(atp).max() > 0

    # integrated gradients per feature, computed through the spliced model with the code itself as the leaf
    steps = 8
    ig = feature_attribution(t.cc, t.s, delta, mean_gradient(t.model, t.prompts, t.site, t.h_clean, t.h_corr,
                                                             [(j + 0.5) / steps for j in range(steps)], 4), 4)
    e_clean, e_corr = t.h_clean - decode_at(t.cc, t.f_clean, t.s), t.h_corr - decode_at(t.cc, t.f_corr, t.s)
    want = torch.zeros(t.cc.d_sae, dtype=torch.float64)
    for j in range(steps):
        a = (j + 0.5) / steps
        f = (t.f_corr + a * delta).requires_grad_(True)
        m = t.metric(decode_at(t.cc, f, t.s) + e_corr + a * (e_clean - e_corr))
        want += (delta * torch.autograd.grad(m, f)[0]).sum((0, 1)) / steps
    np.testing.assert_allclose(ig, want.numpy(), rtol=1e-8, atol=1e-12)


def test_integrated_gradients_are_complete_and_patching_is_exact(suite, dataset):
    t = Spliced(suite, dataset, "relu", n_prompts=8)
    rng = np.random.default_rng(0)
    sel, test = split_prompts(t.prompts, 0.5, seed=1)
    r = attribute_snapshot(t.model, t.cc, t.s, "step2", 2, t.prompts, t.site, t.h_clean, t.h_corr, t.f_clean,
                           t.f_corr, (sel, test), ig_steps=32, ks=[1, 3, 1000], random_sets=2, batch_size=4, rng=rng)
    p_sel, p_test = take(t.prompts, sel), take(t.prompts, test)

    def metric(prompts, h):
        return logit_diff(logits_with(t.model, prompts.clean, 1, "resid_post", 1, h), prompts).mean().item()

    # attributions come from the selection prompts only, the causal check from the test prompts only
    assert r.select_clean == pytest.approx(metric(p_sel, t.h_clean[sel]), abs=1e-12)
    assert r.select_baseline == pytest.approx(metric(p_sel, t.h_corr[sel]), abs=1e-12)
    assert r.metric_clean == pytest.approx(metric(p_test, t.h_clean[test]), abs=1e-12)
    assert r.metric_baseline == pytest.approx(r.metric_corrupted, abs=1e-9)  # resid_post carries everything
    sel_gap = r.select_clean - r.select_baseline
    assert abs(sel_gap) > 1e-3 and abs(r.metric_clean - r.select_clean) > 1e-6  # two different sets of prompts
    assert r.ig.sum() + r.error_ig == pytest.approx(sel_gap, rel=1e-4)  # completeness on the selection half
    delta_sel = (t.f_clean - t.f_corr)[sel]
    grad = mean_gradient(t.model, p_sel, t.site, t.h_clean[sel], t.h_corr[sel], [(j + 0.5) / 32 for j in range(32)], 4)
    np.testing.assert_allclose(r.ig, feature_attribution(t.cc, t.s, delta_sel, grad, 4), rtol=1e-9, atol=1e-14)
    n_changed = int(r.changed.sum())
    assert r.ks == [1, 3, n_changed] and len(r.break_random[0]) == 2  # k capped at the changed features
    assert r.break_random[-1] == []  # no control set can be disjoint from every changed feature

    # breaking every changed feature is the clean run with the corrupted code and the clean error term
    e_clean, e_corr = t.h_clean - decode_at(t.cc, t.f_clean, t.s), t.h_corr - decode_at(t.cc, t.f_corr, t.s)
    changed = np.flatnonzero(r.changed)
    top, rand, restore = causal_check(t.model, t.cc, t.s, t.prompts, t.site, t.h_clean, t.h_corr,
                                      t.f_clean - t.f_corr, [changed], [[changed[::-1]]], 4)
    assert top[0] == pytest.approx(t.metric(decode_at(t.cc, t.f_corr, t.s) + e_clean).item(), rel=1e-9)
    assert rand[0][0] == pytest.approx(top[0], rel=1e-9)  # all changed features, in another order
    assert restore[0] == pytest.approx(t.metric(decode_at(t.cc, t.f_clean, t.s) + e_corr).item(), rel=1e-9)
    # the reported break_top at k=1 is the test prompts' metric with the top selection feature patched
    f = int(np.argmax(r.ig))
    d = (t.f_clean - t.f_corr)[test][..., [f]] @ (t.cc.W_dec[[f], t.s] / t.cc.scale[t.s])
    assert r.break_top[0] == pytest.approx(metric(p_test, t.h_clean[test] - d), rel=1e-9)


# ---- the prompt split and the matched controls ---------------------------------------------------------------------
def test_split_puts_no_prompt_in_both_halves(suite):
    p = Induction(n_prompts=40, seq_len=4, seed=2).prompts(load_tokenizer(str(suite), "step0"))
    # duplicates, as a template task can draw: rows 0-3 share one clean prompt, rows 5 and 6 one corrupted prompt
    clean, corrupted = p.clean.clone(), p.corrupted.clone()
    clean[1:4], corrupted[6] = clean[0], corrupted[5]
    p = p._replace(clean=clean, corrupted=corrupted)
    for seed in range(6):
        sel, test = split_prompts(p, 0.5, seed)
        assert sorted([*sel, *test]) == list(range(40)) and not set(sel) & set(test)
        rows = lambda ids, idx: {tuple(r) for r in ids[idx].tolist()}  # noqa: E731
        assert not rows(clean, sel) & rows(clean, test) and not rows(corrupted, sel) & rows(corrupted, test)
        assert 19 <= len(sel) <= 23  # half, give or take the 4-prompt group
    assert not np.array_equal(split_prompts(p, 0.5, 0)[0], split_prompts(p, 0.5, 1)[0])  # seeded
    assert len(split_prompts(p, 0.25, 0)[0]) in range(10, 14)
    with pytest.raises(ValueError, match="cannot be split"):
        split_prompts(p._replace(clean=p.clean[:1].repeat(3, 1), corrupted=p.corrupted[:1].repeat(3, 1)), 0.5, 0)


def test_answer_mask_and_change_size_by_hand():
    p = TaskPrompts(torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2), torch.zeros(2), torch.tensor([5, 3]), [])
    mask = answer_mask(p, T=5, drop_first=1)  # positions 1..5
    assert mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    delta = torch.zeros(2, 5, 3)
    delta[0, 0, 0], delta[1, 2, 0] = 2.0, -4.0  # counted: 6 over 8 positions
    delta[1, 4, 1] = 9.0  # on the padding after prompt 1's answer: not counted
    delta[0, 4, 2] = -1.0
    np.testing.assert_allclose(change_size(delta, mask), [6 / 8, 0.0, 1 / 8])


def test_matched_controls_are_disjoint_and_as_large_as_the_top_set():
    rng = np.random.default_rng(0)
    F = 1024
    size = np.exp(rng.normal(0, 1.5, F))  # mean |delta f| per feature, spread over two orders of magnitude
    size[rng.choice(F, 200, replace=False)] = 0  # features the corruption does not change
    pool = np.flatnonzero(size > 0)
    # a top set biased to large effects, as attribution picks them (half from the largest 10%)
    big = pool[np.argsort(-size[pool])[:80]]
    top = np.concatenate([rng.choice(big, 25, replace=False), rng.choice(np.setdiff1d(pool, big), 25, replace=False)])
    sets = matched_controls(size, top, pool, draws=8, rng=rng, candidates=5)
    assert len(sets) == 8
    for c in sets:
        assert len(c) == 50 and len(set(c)) == 50 and not set(c) & set(top) and set(c) <= set(pool)
        assert size[c].mean() == pytest.approx(size[top].mean(), rel=0.10)  # stated tolerance: 10%
    assert len({tuple(sorted(c)) for c in sets}) > 1  # draws differ
    # the old control (uniform over every changed feature) is far smaller than the top set
    uniform = [size[rng.choice(pool, 50, replace=False)].mean() for _ in range(8)]
    assert np.mean(uniform) < 0.6 * size[top].mean()
    assert matched_controls(size, pool[:10], pool[:15], draws=2, rng=rng) == []  # 5 left for 10: no control
    # per feature too: each control feature is one of the 5 nearest free ones to its running target, so the
    # largest top feature gets one of the 5 largest in the pool when nothing as large is left
    largest = top[np.argmax(size[top])]
    rest = np.setdiff1d(pool, top)
    assert all(size[c[0]] >= np.sort(size[rest])[-5] or size[largest] < np.sort(size[rest])[-5] for c in sets)


# ---- analyze.py attribution=<task> ----------------------------------------------------------------------------------
def test_analyze_attribution_end_to_end(suite, dataset, tmp_path):
    from analyze import analyze_run
    from tests.test_analysis import compose_analyze
    run = write_run(tmp_path / "run", make_crosscoder("relu", read_manifest(dataset)), dataset)
    assert model_site(load_run(run)) == Site(str(suite), 1, "resid_post", 1)  # read from the dataset manifest
    small = ["attribution.task.n_prompts=8", "attribution.task.seq_len=5", "attribution.ks=[1,4]",
             "attribution.show_k=4", "attribution.ig_steps=4", "attribution.random_sets=3", "attribution.n_top=5",
             "max_tokens=400", "n_browser_features=2"]
    out = analyze_run(compose_analyze([f"run={run}", "attribution=induction", *small]))
    folder = out / "attribution" / "induction"
    result = json.loads((folder / "attribution.json").read_text())
    assert [s["name"] for s in result["snapshots"]] == REVISIONS and result["task"] == "induction"
    assert result["task_config"]["seq_len"] == 5 and result["task_config"]["corpus"]["split"] == "validation"
    assert result["split"]["selection"] == result["split"]["test"] == 4
    for s in result["snapshots"]:
        assert s["ks"] == [1, 4] and len(s["top_features"]) == 5
        # 4 steps in float32: quadrature error (the float64 test above checks completeness tightly)
        assert abs(s["completeness_error"]) <= 0.05 * abs(s["selection"]["gap"]) + 1e-5
        assert s["top_features"][0]["ig"] >= s["top_features"][-1]["ig"]
        assert s["learned"] == (s["gap"] >= 0.1) and s["selection"]["learned"] == (s["selection"]["gap"] >= 0.1)
        if s["selection"]["learned"]:  # features' and error term's shares add up to the gap (completeness)
            assert s["feature_share"] + s["error_share"] == pytest.approx(
                1 + s["completeness_error"] / s["selection"]["gap"], abs=1e-9)
        else:
            assert s["feature_share"] is None and s["error_share"] is None
        if not s["learned"]:
            assert s["break_top_closed"] == [None, None]
        assert len(s["break_random"][1]) == 3 and s["size_random_mean"][1] > 0
    npz = np.load(folder / "attribution.npz")
    assert npz["ig"].shape == npz["atp"].shape == (3, 48)
    np.testing.assert_allclose(npz["ig"].sum(1), [s["sum_ig"] for s in result["snapshots"]], rtol=1e-9)
    import pandas as pd
    top = pd.read_csv(folder / "top_features.csv")
    assert len(top) == 15 and list(top.columns[:4]) == ["snapshot", "step", "rank", "feature"]
    assert {"category", "emergence_step", "norm_rel"} <= set(top.columns)  # joined with the feature table
    assert (folder / "fig7_attribution.png").stat().st_size > 20_000
    page = (out / "report.html").read_text()
    assert "Attribution: induction" in page and "fig7_attribution" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    clean = events.Scalars("attribution/induction/metric_clean")
    assert [e.step for e in clean] == [0, 1, 2]
    assert [e.value for e in clean] == pytest.approx([s["metric_clean"] for s in result["snapshots"]], rel=1e-6)
    assert "attribution/induction/break_random4" in events.Tags()["scalars"]

    # the snapshot-local code: its own folder, beside the joint code's
    out = analyze_run(compose_analyze([f"run={run}", "attribution=induction", "attribution.code=local", *small]))
    local = json.loads((out / "attribution" / "induction_local" / "attribution.json").read_text())
    assert local["code"] == "local" and result["code"] == "joint" and local["task"] == "induction_local"
    assert [s["metric_clean"] for s in local["snapshots"]] == [s["metric_clean"] for s in result["snapshots"]]
    assert "Attribution: induction_local" in (out / "report.html").read_text()

    # a second task's failure names the task; an unknown snapshot names the key
    with pytest.raises(ValueError, match="'ioi'"):
        analyze_run(compose_analyze([f"run={run}", "attribution=ioi", "max_tokens=400", "n_browser_features=0"]))
    with pytest.raises(ValueError, match=r"attribution.snapshots: \['step9'\]"):
        analyze_run(compose_analyze([f"run={run}", "attribution=induction", "attribution.snapshots=[step9]",
                                     "max_tokens=400", "n_browser_features=0"]))


def test_attribution_needs_the_snapshot_models(dataset, tmp_path):
    from analysis.attribution import model_site
    run = tmp_path / "run"
    run.mkdir()
    make_crosscoder("relu", read_manifest(dataset)).save(run)  # no config.yaml: no dataset, no model record
    with pytest.raises(ValueError, match="attribution.repo="):
        model_site(load_run(run))


def test_summary_gap_fractions_and_verdict_by_hand():
    from types import SimpleNamespace

    from analysis.attribution import SnapshotAttribution
    from analysis.attribution_summary import summarise
    from analysis.report import attribution_html
    cfg = SimpleNamespace(n_top=2, min_gap=0.5, show_k=1, random_sets=2, ig_steps=4, match_candidates=5)
    # selection gap 1.5 - (-0.5) = 2.0: feature share (0.2 + 1.2 - 0.1) / 2 = 0.65, error share 0.7 / 2 = 0.35
    learned = SnapshotAttribution(
        name="step8", step=8, select_clean=1.5, select_baseline=-0.5, ig=np.array([0.2, 1.2, -0.1]),
        atp=np.array([0.1, 1.0, 0.0]), error_ig=0.7, size=np.array([0.3, 0.5, 0.0]), metric_clean=2.0,
        metric_corrupted=-0.5, metric_baseline=0.0, ks=[1], break_top=[1.0], break_random=[[1.8, 2.0]],
        restore_top=[1.5], size_top=[0.5], size_random=[[0.4, 0.6]])
    nothing = SnapshotAttribution(  # a crosscoder whose code the corruption does not change: no k is usable
        name="step0", step=0, select_clean=0.1, select_baseline=0.1, ig=np.zeros(3), atp=np.zeros(3), error_ig=0.0,
        size=np.zeros(3), metric_clean=0.1, metric_corrupted=0.1, metric_baseline=0.1, ks=[], break_top=[],
        break_random=[], restore_top=[], size_top=[], size_random=[])
    # an effect of 0.3 nats, below min_gap on both halves: numbers in nats are kept, no share of them is reported
    small = SnapshotAttribution(
        name="step4", step=4, select_clean=0.3, select_baseline=0.0, ig=np.array([0.25, 0.1, 0.0]),
        atp=np.zeros(3), error_ig=-0.05, size=np.array([0.2, 0.1, 0.0]), metric_clean=0.3, metric_corrupted=0.0,
        metric_baseline=0.0, ks=[1], break_top=[0.05], break_random=[[0.3, 0.29]], restore_top=[0.2],
        size_top=[0.2], size_random=[[0.1, 0.1]])
    task = Induction(n_prompts=1, seq_len=2)
    prompts = SimpleNamespace(clean=torch.zeros(4, 4), examples=[])
    out = summarise(task, prompts, Site("repo", 1, "resid_post", 1), [nothing, small, learned], None, cfg,
                    (np.array([0, 2]), np.array([1, 3])))
    s0, s_small, s1 = out["snapshots"]
    assert out["split"]["selection"] == 2 and out["split"]["test"] == 2
    assert not s0["learned"] and s0["ks"] == [] and s0["break_random_mean"] == []
    assert s1["learned"] and s1["gap"] == 2.0 and s1["selection"] == {"metric_clean": 1.5, "metric_baseline": -0.5,
                                                                     "gap": 2.0, "learned": True}
    assert s1["feature_share"] == pytest.approx(0.65) and s1["error_share"] == pytest.approx(0.35)
    assert s1["break_top_closed"] == [0.5] and s1["break_random_closed_mean"] == [pytest.approx(0.05)]
    assert s1["break_random_closed_std"] == [pytest.approx(0.05)]
    assert s1["restore_top_recovered"] == [0.75]
    assert s1["break_random_mean"] == [pytest.approx(1.9)] and s1["break_random_std"] == [pytest.approx(0.1)]
    assert s1["size_top"] == [0.5] and s1["size_random_mean"] == [pytest.approx(0.5)]
    assert s1["control_size_ratio"] == [pytest.approx(1.0)]
    assert s1["completeness_error"] == pytest.approx(1.3 + 0.7 - 2.0)
    assert [f["feature"] for f in s1["top_features"]] == [1, 0] and s1["top_features"][0]["share_of_gap"] == 0.6
    assert not s_small["learned"] and not s_small["selection"]["learned"]
    assert s_small["break_top"] == [0.05] and s_small["break_random_mean"] == [pytest.approx(0.295)]  # nats: kept
    for key in ("feature_share", "error_share"):
        assert s_small[key] is None
    for key in ("break_top_closed", "break_random_closed_mean", "break_random_closed_std", "restore_top_recovered"):
        assert s_small[key] == [None]
    assert all(f["share_of_gap"] is None for f in s_small["top_features"])
    assert out["causal_check"] == {**out["causal_check"], "learned_snapshots": 1, "passed": 1}
    # the report prints the learned snapshot's shares and none of the small one's
    page = attribution_html(json.loads(json.dumps(out)), None)
    row = lambda name: page.split(f"<td>{name}</td>")[1].split("</tr>")[0]  # noqa: E731
    assert "65%" in row("step8") and "35%" in row("step8") and "#1 (60%)" in row("step8") and "5% ± 5%" in row("step8")
    assert "%" not in row("step4") and "#0, #1" in row("step4")


def test_local_code_moves_only_with_the_snapshots_own_activation(dataset):
    from analysis.attribution import local_corrupted
    cc = make_crosscoder("relu", read_manifest(dataset))
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randn(3, 4, 3, 32, generator=g) * 4, torch.randn(3, 4, 3, 32, generator=g) * 4
    mixed = local_corrupted(clean, corr, 1)
    assert torch.equal(mixed[:, :, 1], corr[:, :, 1]) and torch.equal(mixed[:, :, [0, 2]], clean[:, :, [0, 2]])
    # reference: the encoder's pre-activation, sum over snapshots of (a_s scale_s) W_enc[s], by hand
    x = mixed * cc.scale[:, None]
    pre = torch.einsum("ntsd,sdf->ntf", x, cc.W_enc) + cc.b_enc
    torch.testing.assert_close(snapshot_code(cc, mixed, 1), torch.relu(pre), rtol=1e-5, atol=1e-5)
    # an encoder that reads snapshot 1 alone: the local and the joint corrupted codes agree; the full one: they differ
    joint, local = snapshot_code(cc, corr, 1), snapshot_code(cc, mixed, 1)
    assert not torch.allclose(joint, local)
    with torch.no_grad():
        cc.W_enc[[0, 2]] = 0
    torch.testing.assert_close(snapshot_code(cc, corr, 1), snapshot_code(cc, mixed, 1))
