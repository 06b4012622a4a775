"""DDP with 2 processes on CPU (gloo): identical weights, each token of an epoch seen once, same loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, write_toy_dataset

FINGERPRINT = torch.linspace(1, 2, 16, dtype=torch.float64)


class RecordRank(L.Callback):
    """Writes, per rank, a fingerprint of every training token it saw and a digest of its final weights;
    also how many tokens it trained on, which latents fired in each of its batches (as the dead-feature
    metric was handed them) and that metric's final state."""

    def __init__(self, out: str, batches: int):
        self.out, self.batches, self.seen = Path(out), batches, []
        self.n_tokens, self.fired = 0, []

    def on_train_start(self, trainer, pl_module):
        firing = pl_module.dict_metrics[0].firing
        update = firing.update

        def recording_update(latents):
            self.fired.append((latents.detach() > 0).any(0).cpu().numpy())
            update(latents)
        firing.update = recording_update

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.n_tokens += batch.shape[0]
        if batch_idx < self.batches:
            self.seen.append((batch[:, 0].double() @ FINGERPRINT).cpu().numpy())

    def on_train_end(self, trainer, pl_module):
        w = pl_module.crosscoder.W_dec.detach().double()
        rank = trainer.global_rank
        np.save(self.out / f"rank{rank}_tokens.npy", np.concatenate(self.seen))
        np.save(self.out / f"rank{rank}_W_dec.npy", w.numpy())
        firing = pl_module.dict_metrics[0].firing
        np.savez(self.out / f"rank{rank}_firing.npz", n_tokens=self.n_tokens, fired=np.stack(self.fired),
                 counted=firing.tokens.item(), since_fired=firing.since_fired.cpu().numpy())


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    data = write_toy_dataset(tmp_path / "toy", n_samples=40)  # 3 train shards x 10 windows x 32 tokens
    epoch_tokens = 30 * 32
    common = [f"data.path={data}", "data.shuffle_buffer=256", "crosscoder.d_sae=32", "logger=none",
              "trainer.val_check_interval=15", "callbacks.progress_bar.refresh_rate=0", "data.num_workers=1",
              "+callbacks.record._target_=tests.test_ddp.RecordRank"]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    for d in (ddp_dir, single_dir):
        d.mkdir()
    # the first epoch is 2 ranks x 15 batches x 32 tokens (or 15 batches of 64); train for 6 epochs
    run([*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=32",
         "trainer.max_steps=90", "+callbacks.record.batches=15", f"+callbacks.record.out={ddp_dir}",
         f"hydra.run.dir={ddp_dir}"], tmp_path)
    run([*common, "data.batch_size=64", "trainer.max_steps=90", "+callbacks.record.batches=15",
         f"+callbacks.record.out={single_dir}", f"hydra.run.dir={single_dir}"], tmp_path)

    w0, w1 = np.load(ddp_dir / "rank0_W_dec.npy"), np.load(ddp_dir / "rank1_W_dec.npy")
    np.testing.assert_array_equal(w0, w1)

    seen = np.concatenate([np.load(ddp_dir / f"rank{r}_tokens.npy") for r in (0, 1)])
    single = np.load(single_dir / "rank0_tokens.npy")  # the single process's epoch: every train token once
    assert len(seen) == len(single) == epoch_tokens
    np.testing.assert_allclose(np.sort(seen), np.sort(single), rtol=1e-6)  # same tokens, each exactly once
    assert len(np.unique(np.round(seen, 5))) == len(np.unique(np.round(single, 5)))

    # the dead-feature window counts the tokens of both ranks (issue 13): the state on each rank holds the
    # tokens the two ranks trained on together, and each latent's silence since it last fired on either
    firing = [np.load(ddp_dir / f"rank{r}_firing.npz") for r in (0, 1)]
    both = firing[0]["n_tokens"] + firing[1]["n_tokens"]
    assert both == 90 * 64
    assert firing[0]["counted"] == firing[1]["counted"] == both
    fired = firing[0]["fired"] | firing[1]["fired"]  # [steps, F]: fired on either rank at that step
    assert fired.shape == (90, 32)
    step_tokens = 64  # 32 per rank and step
    silent = np.array([step_tokens * (90 - 1 - np.flatnonzero(fired[:, i]).max()) if fired[:, i].any()
                       else 90 * step_tokens for i in range(32)], dtype=np.float64)
    np.testing.assert_array_equal(firing[0]["since_fired"], silent)
    np.testing.assert_array_equal(firing[1]["since_fired"], silent)

    # metrics.json's token count is the tokens the ranks actually trained on (counted batch by batch by
    # RecordRank), not the formula the export computes it with
    a = json.loads((ddp_dir / "metrics.json").read_text())
    b = json.loads((single_dir / "metrics.json").read_text())
    single_seen = int(np.load(single_dir / "rank0_firing.npz")["n_tokens"])
    assert a["tokens"] == both and b["tokens"] == single_seen
    assert both == single_seen == 6 * epoch_tokens
    assert a["val/mse"] == pytest.approx(b["val/mse"], rel=0.05)
    assert a["val/explained_variance"] == pytest.approx(b["val/explained_variance"], abs=0.02)
