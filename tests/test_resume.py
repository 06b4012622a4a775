"""Faults: a run killed with SIGKILL resumes to the same result; NaN loss and corrupt shards are reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from data.datamodule import ActivationDataModule
from tests.conftest import ROOT, compose_train, write_toy_dataset
from train import train

ARGS = ["data.batch_size=64", "data.shuffle_buffer=512", "crosscoder.d_sae=32", "trainer.max_steps=300",
        "trainer.val_check_interval=100", "callbacks.checkpoint.every_n_train_steps=50",
        "callbacks.progress_bar.refresh_rate=0", "logger=none"]


def run_train(args, cwd, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_at_first_checkpoint(proc: subprocess.Popen, run_dir, timeout: float = 180):
    """SIGKILL a training process as soon as it has written checkpoints/last.ckpt; that checkpoint's path."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + timeout
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (run_dir / "metrics.json").exists(), "the run must die part-way"
    return last


def batches(dm: ActivationDataModule, n: int) -> torch.Tensor:
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i >= n:
            break
        out.append(batch)
    return torch.stack(out)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_resumed_loader_continues_the_uninterrupted_batch_sequence(tmp_path, workers):
    # 3 train shards x 10 windows x 32 tokens: an epoch is 30 batches of 32, 10 per worker with 3 workers
    data = write_toy_dataset(tmp_path / "toy", n_samples=40)
    dm = ActivationDataModule(data, batch_size=32, shuffle_buffer=128, val_shards=1, num_workers=workers,
                              verify_sha256=False)
    dm.setup()
    n = 70  # past two epoch boundaries
    full = batches(dm, n)
    assert len({b.numpy().tobytes() for b in full}) == n  # every batch tells itself apart
    for consumed in [1, 2, 3, 4, 13, 32, 47]:
        dm.load_state_dict({"batches": consumed, "seed": 0, "batch_size": 32})
        resumed = batches(dm, n - consumed)
        assert torch.equal(resumed, full[consumed:]), f"{workers} workers, {consumed} batches consumed"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, workers):
    data = write_toy_dataset(tmp_path / "toy", n_samples=60)
    # 120 steps of 64 tokens: about 5 epochs of the 5 train shards. Checkpoints at odd steps: with 2 workers
    # an even number of consumed batches resumed right even before the round-robin fix (issue 13)
    args = [a for a in ARGS if not a.startswith(("callbacks.checkpoint.", "trainer."))]
    args += ["trainer.max_steps=120", "trainer.val_check_interval=60", "callbacks.checkpoint.every_n_train_steps=37",
             f"data.num_workers={workers}"]
    full = run_train([f"data.path={data}", *args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    run_dir = tmp_path / "killed"
    last = kill_at_first_checkpoint(run_train([f"data.path={data}", *args, f"hydra.run.dir={run_dir}"], tmp_path,
                                              wait=False), run_dir)
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 120 and killed_at % 2 == 1, killed_at

    resumed = run_train([f"data.path={data}", *args, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert b["steps"] == a["steps"] == 120
    for key in ["val/explained_variance", "val/l0", "val/mse", "val/dead_fraction"]:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(last, weights_only=False)["state_dict"]
    torch.testing.assert_close(wb["crosscoders.0.W_dec"], wa["crosscoders.0.W_dec"], rtol=1e-4, atol=1e-6)


class PoisonWeights(L.Callback):
    """Sets a decoder weight to NaN after a given step, as a diverging run would."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.crosscoder.W_dec[0, 0, 0] = float("nan")


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(toy_dataset, tmp_path):
    cfg = compose_train([f"data.path={toy_dataset}", *ARGS, "callbacks.checkpoint.every_n_train_steps=10",
                         "+callbacks.poison._target_=tests.test_resume.PoisonWeights", "+callbacks.poison.at_step=25"],
                        tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 25 \(batch 25\)"):
        train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20 and torch.isfinite(ckpt["state_dict"]["crosscoders.0.W_dec"]).all()


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_in_training_stops_naming_it_or_is_skipped_and_counted(tmp_path):
    data = write_toy_dataset(tmp_path / "toy")
    corrupt(data / "shard-000001.tar")
    args = [f"data.path={data}", *ARGS, "trainer.max_steps=40", "trainer.val_check_interval=20"]
    from data.format import FormatError
    with pytest.raises(FormatError, match=r"shard-000001.tar: sha256 differs"):
        train(compose_train(args, tmp_path / "a"))
    metrics = train(compose_train([*args, "data.on_corrupt=skip", "logger=tensorboard"], tmp_path / "b"))
    final = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert final["skipped_shards"] >= 1 and metrics["data/skipped_shards"] >= 1
