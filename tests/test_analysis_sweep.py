"""analyze.py on a sweep: run collection, the Pareto frontier by hand, crosscoders against single-snapshot
SAEs, the figures and report; the real command line (`sweep=` must not clash with conf/sweep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis.sweep import collect_runs, pareto_front, sae_baselines
from tests.conftest import ROOT
from tests.test_analysis import compose_analyze, image_is_drawn, small_run  # noqa: F401 (fixture)

NAMES = ["step0", "step100", "step1000"]


def fake_run(folder: Path, snapshots: list[str], l0: float, ev: float, d_sae: int = 64, l1: float = 1.0) -> Path:
    """A finished run as train.py leaves it (metrics.json + config.yaml), without weights."""
    folder.mkdir(parents=True)
    metrics = {"val/explained_variance": ev, "val/l0": l0, "val/dead_fraction": 0.1, "d_sae": d_sae, "l1_coef": l1,
               "activation": "relu", "snapshots": snapshots,
               **{f"val/explained_variance/{n}": ev - 0.02 * (len(snapshots) - 1 - i) for i, n in enumerate(snapshots)}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    OmegaConf.save(OmegaConf.create({"data": {"path": None, "snapshots": snapshots if len(snapshots) == 1 else None}}),
                   folder / "config.yaml")
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    fake_run(root / "0", NAMES, l0=20, ev=0.90, d_sae=64, l1=2)
    fake_run(root / "1", NAMES, l0=40, ev=0.85, d_sae=64, l1=1)  # beaten by job 0: off the frontier
    fake_run(root / "2", NAMES, l0=60, ev=0.95, d_sae=128, l1=1)
    fake_run(root / "3", ["step1000"], l0=15, ev=0.88, l1=2)
    fake_run(root / "10", ["step1000"], l0=30, ev=0.93, l1=1)
    (root / "sweep_summary.csv").write_text("job\n")
    return root


def test_pareto_front_by_hand():
    l0 = np.array([10, 20, 5, 30, 20, np.nan])
    ev = np.array([0.8, 0.7, 0.6, 0.9, 0.85, 0.99])
    # by increasing L0: 5 (0.6) keep, 10 (0.8) keep, 20 (0.85) keep, 20 (0.7) no, 30 (0.9) keep; NaN never
    assert pareto_front(l0, ev).tolist() == [2, 0, 4, 3]


def test_collect_runs_and_baselines(sweep):
    runs = collect_runs(sweep)
    assert runs.job.tolist() == ["0", "1", "2", "3", "10"]  # numeric job order
    assert runs.kind.tolist() == ["crosscoder"] * 3 + ["sae"] * 2
    assert runs.loc[0, "ev_step0"] == pytest.approx(0.86) and runs.loc[3, "ev_step1000"] == pytest.approx(0.88)
    assert runs.loc[0, "step_step100"] == 100  # parsed from the name: the fake runs have no dataset
    assert pd.isna(runs.loc[3, "ev_step0"])
    base = sae_baselines(runs, NAMES)
    assert [(b["snapshot"], b["step"], b["l0"]) for b in base] == [("step1000", 1000, 15), ("step1000", 1000, 30)]
    assert sae_baselines(runs, ["step0"]) == []


def test_analyze_sweep_outputs(sweep):
    from analyze import analyze_sweep
    out = analyze_sweep(compose_analyze([f"sweep={sweep}"]))
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 5
    facts = json.loads((out / "sweep_analysis.json").read_text())
    assert [r["job"] for r in facts["frontier"]["crosscoder"]] == ["0", "2"]
    assert [r["job"] for r in facts["frontier"]["sae"]] == ["3", "10"]
    for name in ("fig5_pareto.png", "fig5_crosscoder_vs_sae.png"):
        assert image_is_drawn(out / name), name
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and page.count("src=") == 2 and "http" not in page


def test_sweep_without_sae_runs_still_draws(tmp_path):
    from analyze import analyze_sweep
    root = tmp_path / "m"
    fake_run(root / "0", NAMES, l0=20, ev=0.9)
    fake_run(root / "1", NAMES, l0=10, ev=0.8)
    out = analyze_sweep(compose_analyze([f"sweep={root}", "tensorboard=false"]))
    assert image_is_drawn(out / "fig5_crosscoder_vs_sae.png")
    assert "sae" not in json.loads((out / "sweep_analysis.json").read_text())["frontier"]


def test_command_line_and_errors(sweep, tmp_path, capsys, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"sweep={sweep}", f"out={tmp_path / 'o'}",
                           "tensorboard=false"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "report.html").is_file()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # Hydra writes nothing
    from analyze import analyze_sweep, main
    with pytest.raises(FileNotFoundError, match="nowhere: no such sweep or run folder"):
        analyze_sweep(compose_analyze([f"sweep={tmp_path / 'nowhere'}"]))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:  # the project's own error: one line on stderr, exit status 1
        main.__wrapped__(compose_analyze([]))
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exactly one of run=<run folder> or sweep=<multirun folder>" in err[0]


def test_run_in_a_sweep_shows_its_sae_siblings_in_figure_4(small_run):
    from analyze import analyze_run
    run, model, data = small_run  # <tmp>/run; make <tmp> a sweep holding one SAE on step1000
    (run.parent / "sweep_summary.csv").write_text("job\n")
    fake_run(run.parent / "sae", ["step1000"], l0=3.0, ev=0.75)
    out = analyze_run(compose_analyze([f"run={run}", "tensorboard=false", "n_browser_features=2"]))
    s = json.loads((out / "summary.json").read_text())
    assert [(b["snapshot"], b["step"], b["l0"], b["explained_variance"]) for b in s["baselines"]] == \
        [("step1000", 1000, 3.0, 0.75)]
    assert image_is_drawn(out / "fig4_ev_l0.png")


@pytest.mark.parametrize("override, key", [("emergence_fraction=0", "emergence_fraction"),
                                           ("n_contexts=0", "n_contexts"), ("max_tokens=-5", "max_tokens")])
def test_bad_config_values_are_named(override, key):
    from analysis.config import check
    with pytest.raises(ValueError, match=f"conf/analyze.yaml: {key}="):
        check(compose_analyze(["run=somewhere", override]))


def test_jobs_that_trained_several_dictionaries(tmp_path, small_run):
    from analysis.run_files import load_run
    root = tmp_path / "multi"
    fake_run(root / "0" / "l1_1-F64", NAMES, l0=30, ev=0.9, l1=1)
    fake_run(root / "0" / "l1_2-F64", NAMES, l0=15, ev=0.8, l1=2)
    fake_run(root / "1", ["step1000"], l0=10, ev=0.85)
    runs = collect_runs(root)
    assert runs.job.tolist() == ["0/l1_1-F64", "0/l1_2-F64", "1"]
    assert runs.kind.tolist() == ["crosscoder", "crosscoder", "sae"]
    with pytest.raises(FileNotFoundError, match=r"holds 2 dictionaries \(l1_1-F64, l1_2-F64\)"):
        load_run(root / "0")


def test_sae_baselines_from_a_separate_sweep(tmp_path):
    from analyze import analyze_sweep
    fake_run(tmp_path / "cc" / "0", NAMES, l0=20, ev=0.9)
    fake_run(tmp_path / "sae" / "0", ["step0"], l0=10, ev=0.8)
    fake_run(tmp_path / "sae2" / "0", ["step100"], l0=12, ev=0.82)
    out = analyze_sweep(compose_analyze([f"sweep={tmp_path / 'cc'}", "tensorboard=false",
                                         f"baselines=[{tmp_path / 'sae'},{tmp_path / 'sae2'}]"]))
    runs = pd.read_csv(out / "runs.csv", dtype={"job": str})
    assert runs.kind.tolist() == ["crosscoder", "sae", "sae"] and runs.job.tolist() == ["0", "0", "0"]
    assert runs.run.tolist()[1:] == [str(tmp_path / "sae" / "0"), str(tmp_path / "sae2" / "0")]


def test_crosscoders_and_saes_share_one_l0_definition(sweep):
    """An analysed crosscoder's summary.json holds a thresholded per-snapshot L0 ("active at s"); the sweep must
    not mix it with the SAEs' f > 0 count: both sides read val/l0, whether or not a run was analysed."""
    from analysis.sweep import CAPTIONS, L0_DEFINITION
    from analyze import analyze_sweep
    analysed = sweep / "0" / "analysis"
    analysed.mkdir()
    (analysed / "summary.json").write_text(json.dumps({"l0": {"overall": 20, "per_snapshot": dict(zip(NAMES, [2, 5, 7]))}}))
    runs = collect_runs(sweep)
    assert runs.loc[0, ["l0_step0", "l0_step100", "l0_step1000"]].tolist() == [20, 20, 20]  # val/l0, not 2 / 5 / 7
    assert runs.loc[3, "l0_step1000"] == 15 and runs.loc[4, "l0_step1000"] == 30  # the SAEs' val/l0
    out = analyze_sweep(compose_analyze([f"sweep={sweep}", "tensorboard=false"]))
    assert json.loads((out / "sweep_analysis.json").read_text())["l0_definition"] == L0_DEFINITION
    assert "f > 0" in L0_DEFINITION and L0_DEFINITION in CAPTIONS["fig5_crosscoder_vs_sae"]
    assert "f &gt; 0" in (out / "report.html").read_text()  # the caption, as the report prints it


def test_analyze_config_shares_train_paths(monkeypatch, tmp_path):
    """analyze.yaml sits beside train.yaml and uses `paths`: CROSSCODER_CACHE moves the attribution corpus cache,
    and `sweep=` is analyze's key, not train.py's multirun group (now hparams_search/)."""
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path / "cache"))
    cfg = compose_analyze([f"sweep={tmp_path}", "attribution=induction"])
    assert cfg.sweep == str(tmp_path)
    assert cfg.attribution.task.corpus.cache_dir == str(tmp_path / "cache" / "hf_datasets")
