"""Tokens per second the DataModule delivers from float16 shards on disk, against what a step consumes.

    python -m bench.loader [--tokens 2000000] [--workers 1]

Writes float16 shards (S=8, D=128, the small shape of bench/step.py) to a temporary folder, streams them
through ActivationDataModule with the shuffle buffer on (the real pipeline: sha256 check, decode, snapshot
selection, token shuffle, float32 batches), and times a relu crosscoder step (F=4096, batch 1024) in the
same run. The loader must deliver several times what the step consumes so training never waits on data.
Writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.step import our_step, timed  # noqa: E402
from data.datamodule import ActivationDataModule  # noqa: E402
from data.format import DatasetWriter, Snapshot  # noqa: E402

S, D, F, B, T = 8, 128, 4096, 1024, 128


def write_shards(folder: Path, n_tokens: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, model="bench", hook_point="bench", snapshots=[Snapshot(f"step{i}", i) for i in range(S)],
                       d_model=D, tokens_per_sample=T, dtype="float16", samples_per_shard=256) as w:
        block = rng.standard_normal((64, T, S, D)).astype(np.float32)
        for i in range(n_tokens // T):
            w.write(block[i % 64], np.arange(T), doc=i, start=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.tokens)
        dm = ActivationDataModule(tmp, batch_size=B, shuffle_buffer=262_144, val_shards=1, num_workers=args.workers)
        dm.setup()
        epoch = dm.train_tokens_per_epoch
        loader = iter(dm.train_dataloader())
        next(loader)  # worker start-up and the first buffer fill are not the steady state
        start, seen = time.perf_counter(), 0
        while seen < epoch:
            seen += next(loader).shape[0]
        load_s = time.perf_counter() - start
    step_s = timed(our_step(S, D, F, B, "relu", bf16=False), repeats=5)
    result = {"shape": f"S={S} D={D} F={F}", "batch": B, "workers": args.workers, "shuffle_buffer": 262_144,
              "loader_tokens_per_s": round(seen / load_s), "step_tokens_per_s": round(B / step_s),
              "ratio": round(seen / load_s / (B / step_s), 2), "bytes_per_token_read": 2 * S * D}
    print(f"loader: {result['loader_tokens_per_s']:,} tokens/s ({args.workers} worker(s), shuffle buffer on)")
    print(f"step:   {result['step_tokens_per_s']:,} tokens/s (relu, fp32, F={F})")
    print(f"loader / step = {result['ratio']}x")
    out = ROOT / "bench" / "results" / "loader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
