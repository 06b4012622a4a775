"""The command line as a user meets it: the project's errors as one line naming the file, key or value (exit
status 1, no traceback unless HYDRA_FULL_ERROR=1), config types checked at start-up, no library noise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_train import FAST


def run_train(tmp_path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines


def test_a_missing_dataset_folder_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no_such_dataset"
    (line,) = error_lines(run_train(tmp_path, f"data.path={missing}"))
    assert f"{missing}: no such dataset folder" in line and "HYDRA_FULL_ERROR=1" in line
    full = run_train(tmp_path, f"data.path={missing}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "FormatError" in full.stderr


@pytest.mark.parametrize("override,key,value", [("crosscoder.d_sae=abc", "crosscoder.d_sae", "'abc'"),
                                                ("data.batch_size=1.5", "data.batch_size", "1.5")])
def test_a_config_value_of_the_wrong_type_names_its_key(toy_dataset, tmp_path, override, key, value):
    (line,) = error_lines(run_train(tmp_path, f"data.path={toy_dataset}", override))
    assert line.startswith(f"error: {key}: {value} is not a valid value (expected ")


def test_an_unreachable_hub_snapshot_names_repo_revision_and_the_way_out(tmp_path):
    # data=live loads the snapshot models first; offline, the hub cannot be reached and nothing is cached here
    (line,) = error_lines(run_train(tmp_path, "model=pythia160m", "data=live", "corpus=stdlib",
                                    f"corpus.cache_dir={tmp_path / 'hf'}", env={"HF_HOME": str(tmp_path / "hf_home")}))
    assert "model.repo=EleutherAI/pythia-160m revision=step0" in line
    assert "set model.repo to a local folder" in line


def test_a_short_run_ends_with_its_summary_and_prints_no_library_noise(toy_dataset, tmp_path):
    proc = run_train(tmp_path, f"data.path={toy_dataset}", *FAST, "trainer.max_steps=2", "logger=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "litlogger" not in out and "LeafSpec" not in out
    summary = proc.stdout[proc.stdout.index("Run finished."):]
    assert "validation: explained variance" in summary and "dead latents" in summary
    # the toy dataset's three snapshots, each with its explained variance
    per = next(line for line in summary.splitlines() if "explained variance per snapshot:" in line)
    assert per.count(" 0.") + per.count(" -") + per.count(" 1.") == 3, per
    assert "wall time: data setup" in summary and ", training " in summary  # data.path given: no cache stage
    assert f"python analyze.py run={tmp_path / 'run'}" in summary


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/run", *overrides])


@pytest.mark.parametrize("overrides", [[], ["experiment=synthetic", "crosscoder=batchtopk"], ["experiment=paper_tiny"],
                                       ["experiment=paper_pythia160m", "data=live", "corpus=pile"],
                                       ["experiment=paper_pythia6.9b"], ["trainer=ddp", "crosscoder=jumprelu"],
                                       ["model=pythia70m", "logger=none", "crosscoder=topk"]])
def test_every_shipped_preset_passes_the_start_up_type_check(overrides):
    from cli import check_config
    check_config(compose_train(*overrides))  # no false alarm on what the project ships


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", "trainer.max_steps: 'abc' is not a valid value (expected int)"),
    ("trainer.precision=bf15", "trainer.precision: 'bf15' is not a valid value"),  # a Literal of Lightning's
    ("callbacks.checkpoint.every_n_train_steps=1.5", "callbacks.checkpoint.every_n_train_steps: 1.5 is not"),
    ("model.layer=mid", "model.layer: 'mid' is not a valid value (expected int)"),  # schema, no _target_
    ("model.build.n_layers=four", "model.build.n_layers: 'four' is not"),  # a nested _target_
    ("cache.n_tokens=1e6", "cache.n_tokens: 1000000.0 is not a valid value (expected int)"),
    ("corpus.max_docs=all", "corpus.max_docs: 'all' is not"),
    ("~model.layer", "model: missing key layer (see data.schema.ModelConfig)"),
])
def test_start_up_type_check_names_the_key_in_every_group(override, message):
    from cli import check_config
    with pytest.raises(ValueError) as err:
        check_config(compose_train(override))
    assert str(err.value).startswith(message)


def test_a_trainer_value_of_the_wrong_type_is_one_line_through_the_cli(toy_dataset, tmp_path):
    (line,) = error_lines(run_train(tmp_path, f"data.path={toy_dataset}", "trainer.max_steps=abc"))
    assert line.startswith("error: trainer.max_steps: 'abc' is not a valid value (expected int)")
