"""Live activations against cached shards: training speed in one run, and crosscoder quality by shuffle block.

    python -m bench.live speed   [--steps 200]         # tokens/s live vs cached, share of a live step in forwards
    python -m bench.live quality [--steps 1500]        # EV / L0 / dead fraction by data.block_tokens

Both run the default configuration (`python train.py data=live`: the mini-Pythia suite, 10 snapshots, layer 2,
relu d_sae 1024, batches of 1,024 tokens) on this machine's CPU.

speed: trains the same crosscoder for --steps steps twice through Lightning, once on the live stream and once
on shards (float16, the cache's format and reader, sha256 checked) holding exactly the tokens that the live
stream produced, and times the steps (Lightning's setup and the first batch excluded). The time the live run
spends inside the snapshot models' forwards is measured by wrapping them in a timer in the same run.

quality: trains the crosscoder with train.py at equal tokens and steps on the live stream, changing only how
many consecutive stream tokens are shuffled together (data.block_tokens): (a) the whole run in one block, what
a fully shuffled cache of the same tokens gives; (b) the default block (256 batches) and a quarter of it; (c)
the paper preset's old mixing scaled to this suite (8 windows: one batch, no shuffling beyond it). Every run is validated on
the same held-out
documents. Writes bench/results/live_speed.json / live_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


class StepTimer:
    """Wall time from the end of the first training batch to the end of the last (setup and warm-up excluded)."""

    def __init__(self):
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_end(cb, trainer, *args):
                now = time.perf_counter()
                if trainer.global_step == 1:
                    self.start = now
                self.end, self.steps = now, trainer.global_step - 1
        self.callback = _CB()
        self.start = self.end = 0.0
        self.steps = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


def fit(cfg, datamodule, steps: int, timer: StepTimer | None = None) -> StepTimer:
    import lightning as L
    from hydra.utils import instantiate
    datamodule.setup("fit")
    module = instantiate(cfg.crosscoder, n_snapshots=datamodule.n_snapshots, d_model=datamodule.d_model,
                         snapshot_names=datamodule.snapshot_names, norm_scale=datamodule.norm_scale(),
                         data_mean=datamodule.raw_mean())
    timer = timer or StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer.callback])
    trainer.fit(module, datamodule=datamodule)
    return timer


def speed(steps: int) -> dict:
    import numpy as np
    from hydra.utils import instantiate

    from data.datamodule import ActivationDataModule
    from data.format import DatasetWriter, Snapshot
    from data.snapshots import revision_step
    cfg = compose(["data=live"])
    live = instantiate(cfg.data)
    live.setup("fit")
    models = live.models
    forward = {"seconds": 0.0, "tokens": 0}
    run = models.run
    timer = StepTimer()

    def timed_run(ids, *args, **kwargs):
        t = time.perf_counter()
        out = run(ids, *args, **kwargs)
        if timer.start:  # blocks built once the timed steps have begun (the first block is built before)
            forward["seconds"] += time.perf_counter() - t
            forward["tokens"] += out.shape[0] * out.shape[1]
        return out
    models.run = timed_run
    fit(cfg, live, steps, timer)
    B = live.batch_size
    tokens = timer.steps * B

    # the same stream tokens, cached as the cache writes them
    with tempfile.TemporaryDirectory() as tmp:
        n_windows = -(-(steps + 2) * B // live.T) + 1
        windows = live.rank_windows(0, 1, 0)
        with DatasetWriter(Path(tmp) / "acts", model="tiny", hook_point="live", d_model=live.d_model,
                           snapshots=[Snapshot(r, revision_step(r)) for r in live.revisions],
                           tokens_per_sample=live.T, dtype="float16", samples_per_shard=128) as writer:
            for i in range(0, n_windows, 64):
                ids = np.stack([next(windows) for _ in range(min(64, n_windows - i))])
                acts = run(__import__("torch").from_numpy(ids).long(), live.drop_first, live.buffer_dtype)
                for a, t in zip(acts.numpy(), ids):
                    writer.write(a, t[live.drop_first:], doc=0, start=0)
        cached = ActivationDataModule(str(Path(tmp) / "acts"), batch_size=B, shuffle_buffer=cfg.data.block_tokens,
                                      val_shards=1, num_workers=1)
        cached_timer = fit(compose([]), cached, steps)
    live_tps = tokens / timer.seconds
    cached_tps = cached_timer.steps * B / cached_timer.seconds
    # forward cost per token, times the tokens the timed steps consumed (blocks are not aligned to the timer)
    forwards = forward["seconds"] / max(forward["tokens"], 1) * tokens
    return {"steps_timed": timer.steps, "batch_tokens": B, "snapshots": live.n_snapshots, "d_model": live.d_model,
            "block_tokens": live.block_tokens, "live_tokens_per_s": round(live_tps, 1),
            "cached_tokens_per_s": round(cached_tps, 1), "live_over_cached": round(live_tps / cached_tps, 3),
            "forward_share_of_live_step": round(forwards / timer.seconds, 3),
            "forward_seconds": round(forwards, 2), "forward_tokens_timed": forward["tokens"],
            "live_seconds": round(timer.seconds, 2),
            "cached_seconds": round(cached_timer.seconds, 2), "cached_shuffle_buffer": cfg.data.block_tokens}


QUALITY = {  # label -> data.block_tokens (None: the whole run in one block)
    "a_whole_run_one_block": None,
    "b_default_block": 262144,
    "b_quarter_block": 65536,
    "c_paper_preset_mixing": 1024,
}


def quality(steps: int) -> dict:
    from data.run_folder import read_metrics
    rows = {}
    for label, block in QUALITY.items():
        block = block or steps * 1024
        out = Path(tempfile.mkdtemp(prefix=f"live-{label}-"))
        args = [sys.executable, str(ROOT / "train.py"), "data=live", f"data.block_tokens={block}",
                "data.buffer_dtype=float16", f"trainer.max_steps={steps}", f"hydra.run.dir={out}",
                "callbacks.progress_bar.refresh_rate=0"]
        t = time.time()
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{label}: train.py failed:\n{res.stderr[-3000:]}")
        m = read_metrics(out)
        rows[label] = {"block_tokens": block, "seconds": round(time.time() - t),
                       **{k: m[k] for k in m if k.startswith("val/") or k == "steps"}, "run_dir": str(out)}
        print(label, json.dumps(rows[label]), flush=True)
    a = rows["a_whole_run_one_block"]["val/explained_variance"]
    for row in rows.values():
        row["ev_minus_whole_run"] = round(row["val/explained_variance"] - a, 4)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "quality"])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "speed":
        result = speed(args.steps or 200)
    else:
        result = quality(args.steps or 1500)
    path = RESULTS / f"live_{args.what}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
