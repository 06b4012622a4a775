"""data/run_folder.py: the run folder's one home (names, sub-runs, job order, config.yaml / metrics.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from data import run_folder as rf


def test_job_order_sorts_numbers_naturally_and_names_after():
    jobs = ["10", "2", "0/l1_3-F32", "0", "1", "0/l1_1-F32", "abc"]
    assert sorted(jobs, key=rf.job_order) == ["0", "0/l1_1-F32", "0/l1_3-F32", "1", "2", "10", "abc"]


def test_finished_runs_are_the_folders_with_metrics_in_job_order(tmp_path: Path):
    for job in ("10", "2", "1/l1_2-F8", "1/l1_1-F8", "3"):
        (tmp_path / job).mkdir(parents=True)
        if job != "3":  # job 3 died before writing metrics.json
            rf.write_metrics(tmp_path / job, {"val/l0": 1.0})
    found = [str(p.relative_to(tmp_path)) for p in rf.finished_runs(tmp_path)]
    assert found == ["1/l1_1-F8", "1/l1_2-F8", "2", "10"]


def test_check_run_folder_names_the_missing_path(tmp_path: Path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such run folder"):
        rf.check_run_folder(missing)


def test_check_run_folder_points_at_the_sub_runs_of_several_dictionaries(tmp_path: Path):
    for name in (rf.dictionary_name(1.0, 32), rf.dictionary_name(0.5, 64)):
        folder = rf.dictionary_dir(tmp_path, name)
        folder.mkdir()
        rf.write_metrics(folder, {})
    assert rf.sub_runs(tmp_path) == ["l1_0.5-F64", "l1_1-F32"]
    with pytest.raises(FileNotFoundError, match=r"holds 2 dictionaries \(l1_0.5-F64, l1_1-F32\).*sweep="):
        rf.check_run_folder(tmp_path)
    assert rf.check_run_folder(tmp_path / "l1_1-F32") == tmp_path / "l1_1-F32"


def test_missing_config_and_metrics_read_as_empty(tmp_path: Path):
    assert rf.read_metrics(tmp_path) == {} and not rf.has_metrics(tmp_path)
    assert OmegaConf.to_container(rf.read_config(tmp_path)) == {}


def test_config_and_metrics_round_trip_and_the_sub_run_config(tmp_path: Path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "crosscoder": {"d_sae": [32, 64], "l1_coef": 1.0},
                            "data": {"path": "${run_dir}/acts"}})
    rf.write_config(tmp_path, cfg)
    assert rf.read_config(tmp_path).data.path == f"{tmp_path}/acts"  # resolved when written
    rf.write_metrics(tmp_path, {"val/l0": 3.5, "snapshots": ["a", "b"]})
    assert rf.read_metrics(tmp_path) == {"val/l0": 3.5, "snapshots": ["a", "b"]}
    name = rf.dictionary_name(1.0, 64)
    (tmp_path / name).mkdir()
    rf.write_sub_run_config(tmp_path, name, d_sae=64, l1_coef=1.0)
    sub = yaml.safe_load((tmp_path / name / rf.CONFIG_NAME).read_text())
    assert sub["crosscoder"] == {"d_sae": 64, "l1_coef": 1.0} and sub["run_dir"] == str(tmp_path / name)
    rf.write_sub_run_config(tmp_path, "", d_sae=1)  # a lone dictionary is the run folder itself: nothing to write
    assert rf.dictionary_dir(tmp_path, "") == tmp_path


def test_load_run_names_a_missing_run_folder(tmp_path: Path):
    from analysis.run_files import load_run
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone'}: no such run folder"):
        load_run(tmp_path / "gone")
