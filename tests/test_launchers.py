"""Sweeps through Hydra's launchers: joblib runs locally in parallel; the SLURM config resolves offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT
from tests.test_train import FAST


def test_joblib_launcher_runs_jobs_in_parallel(toy_dataset, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local_parallel", f"data.path={toy_dataset}",
         *FAST, "logger=none", "crosscoder.d_sae=16,32", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib" in proc.stdout + proc.stderr  # the joblib launcher, not the basic one, ran the jobs
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert sorted(r["d_sae"] for r in rows) == [16, 32]
    # both jobs ran to the end, each in its own run folder with its own override
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    wanted = set()
    for job in jobs:
        config = yaml.safe_load((job / "config.yaml").read_text())
        metrics = json.loads((job / "metrics.json").read_text())
        assert config["run_dir"] == str(job) and (job / "crosscoder.safetensors").is_file()
        assert metrics["d_sae"] == config["crosscoder"]["d_sae"] and metrics["steps"] == 30
        assert "val/explained_variance" in metrics
        wanted.add(config["crosscoder"]["d_sae"])
    assert wanted == {16, 32}


def test_slurm_launcher_config_resolves_without_a_cluster(tmp_path):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                                          "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert launcher.max_num_timeout == 3 and cfg.trainer.strategy == "ddp"
    import submitit  # noqa: F401  the launcher's engine is installed by requirements.txt


def test_fsdp_trainer_config_builds_its_strategy():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and cfg.trainer.precision == "bf16-mixed"


def test_sae_baseline_sweep_covers_every_default_snapshot_one_at_a_time():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=sae_baselines"], return_hydra_config=True)
    value = cfg.hydra.sweeper.params["data.snapshots"]
    jobs = list(OverridesParser.create().parse_overrides([f"data.snapshots={value}"])[0].sweep_iterator())
    assert jobs == [[r] for r in cfg.model.revisions]
