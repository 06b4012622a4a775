"""train.py end to end: Hydra composition, a short fit, the run folder, TensorBoard, multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from crosscoder.model import Crosscoder
from tests.conftest import ROOT, compose_train
from train import train

FAST = ["data.batch_size=64", "data.shuffle_buffer=256", "crosscoder.d_sae=32", "trainer.max_steps=30",
        "trainer.val_check_interval=15", "trainer.log_every_n_steps=5", "callbacks.progress_bar.refresh_rate=0",
        "callbacks.checkpoint.every_n_train_steps=15", "callbacks.decoder_norms.every_n_steps=15"]


def read_scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["histograms"]


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_train_writes_run_folder_and_tensorboard(toy_dataset, tmp_path, activation):
    run = tmp_path / "run"
    cfg = compose_train([f"data.path={toy_dataset}", f"crosscoder={activation}", "crosscoder.k=4", *FAST], run)
    metrics = train(cfg)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(toy_dataset) and saved["crosscoder"]["activation"] == activation

    model = Crosscoder.load(run)
    assert (model.n_snapshots, model.d_model, model.d_sae) == (3, 16, 32)
    assert model.snapshot_names == ["step0", "step2", "step4"]
    # the saved scale brings each snapshot's mean norm to sqrt(D) = 4 (toy snapshots differ by 1x, 2x, 3x)
    ratios = model.scale[0] / model.scale
    torch.testing.assert_close(ratios, torch.tensor([1.0, 2.0, 3.0]), rtol=1e-3, atol=1e-3)

    final = json.loads((run / "metrics.json").read_text())
    assert final["steps"] == 30 and final["d_sae"] == 32 and final["activation"] == activation
    for name in model.snapshot_names:
        assert 0 < final[f"val/explained_variance/{name}"] <= 1
    assert final["val/explained_variance"] == pytest.approx(metrics["val/explained_variance"])

    scalars, histograms = read_scalars(run / "tensorboard")
    for tag in ["train/loss", "train/mse", "train/sparsity", "train/l0", "train/dead_fraction",
                "val/explained_variance", "val/explained_variance/step4", "val/l0", "val/dead_fraction", "val/mse",
                "perf/data_wait_fraction", "perf/tokens_per_s"]:
        assert tag in scalars, tag
    assert [step for step, _ in scalars["val/explained_variance"]][-1] == 29  # validation ran at the end
    assert scalars["val/explained_variance"][-1][1] == pytest.approx(final["val/explained_variance"], rel=1e-6)
    assert "decoder_norm/step0" in histograms
    assert 0 <= scalars["perf/data_wait_fraction"][-1][1] < 1 and scalars["perf/tokens_per_s"][-1][1] > 0
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]  # it learns
    # TensorBoard's HParams view: the run's hyperparameters with its final validation metrics, logged once
    params, hp_metrics = read_hparams(run / "tensorboard")
    assert params["d_sae"] == 32 and params["activation"] == activation and params["l1_coef"] == cfg.crosscoder.l1_coef
    assert hp_metrics == ["hparams/val/dead_fraction", "hparams/val/explained_variance", "hparams/val/l0",
                          "hparams/val/mse"]
    assert scalars["hparams/val/explained_variance"] == [(30, pytest.approx(final["val/explained_variance"]))]


def read_hparams(event_dir) -> tuple[dict, list[str]]:
    """The HParams plugin's session: hyperparameters and the metric tags it lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    params = {k: (v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
                  else v.bool_value) for k, v in start.hparams.items()}
    return params, sorted(m.name.tag for m in experiment.metric_infos)


def test_training_improves_explained_variance(toy_dataset, tmp_path):
    cfg = compose_train([f"data.path={toy_dataset}", *FAST, "trainer.max_steps=200", "trainer.val_check_interval=100",
                         "crosscoder.d_sae=96", "crosscoder.l1_coef=1.0", "crosscoder.lr=3e-3"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["val/explained_variance"] > 0.85
    assert metrics["val/l0"] < 32  # of 96 latents; the toy data has about 4 active features per token


def test_config_typo_is_named(toy_dataset, tmp_path):
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="crosscoder.d_sea"):
        compose_train([f"data.path={toy_dataset}", "crosscoder.d_sea=64"], tmp_path)


def test_multirun_two_jobs_writes_summary(toy_dataset, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", f"data.path={toy_dataset}", *FAST, "logger=none",
         "crosscoder.l1_coef=0.1,3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["l1_coef"] for r in rows] == [0.1, 3.0]
    assert rows[0]["val/l0"] > rows[1]["val/l0"]  # a larger penalty gives a sparser code
    assert (sweep / "0" / "crosscoder.safetensors").is_file() and (sweep / "1" / "crosscoder.safetensors").is_file()
    header = (sweep / "sweep_summary.csv").read_text().splitlines()[0]
    assert header.startswith("job,d_sae,l1_coef,activation,val/l0,val/explained_variance")


def test_several_dictionaries_on_one_stream_equal_separate_runs(toy_dataset, tmp_path):
    args = [f"data.path={toy_dataset}", *FAST, "trainer.max_steps=20", "trainer.val_check_interval=10"]
    train(compose_train([*args, "crosscoder.l1_coef=[0.1,3.0]"], tmp_path / "multi"))
    train(compose_train([*args, "crosscoder.l1_coef=0.1"], tmp_path / "single"))
    folders = sorted(p.name for p in (tmp_path / "multi").iterdir() if (p / "metrics.json").is_file())
    assert folders == ["l1_0.1-F32", "l1_3-F32"]
    low, high = (json.loads((tmp_path / "multi" / f / "metrics.json").read_text()) for f in folders)
    assert (low["l1_coef"], high["l1_coef"]) == (0.1, 3.0) and low["val/l0"] > high["val/l0"]
    sub_config = yaml.safe_load((tmp_path / "multi" / "l1_3-F32" / "config.yaml").read_text())
    assert sub_config["crosscoder"]["l1_coef"] == 3.0
    scalars, _ = read_scalars(tmp_path / "multi" / "l1_3-F32" / "tensorboard")
    assert scalars["val/explained_variance"][-1][1] == pytest.approx(high["val/explained_variance"], rel=1e-6)
    # the first dictionary saw the same batches, the same init and its own Adam state: a separate run's twin
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert low["val/explained_variance"] == pytest.approx(single["val/explained_variance"], rel=1e-5)
    torch.testing.assert_close(Crosscoder.load(tmp_path / "multi" / "l1_0.1-F32").W_dec,
                               Crosscoder.load(tmp_path / "single").W_dec, rtol=1e-5, atol=1e-6)
