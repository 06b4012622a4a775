"""Peak memory (RSS) of training at the large shape against parameters + gradients + Adam state + batch,
and whether it grows with the number of shards.

    python -m bench.memory [--steps 3]

Each measurement is a fresh process (peak RSS is per process) that trains a relu crosscoder (S=8, D=768,
F=16384, batch 1024, fp32) for a few steps with the real datamodule and Lightning Trainer, on 2 and then 8
float16 shards. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

S, D, F, B, T = 8, 768, 16384, 1024, 128
BUFFER = 16_384  # shuffle-buffer tokens: 16,384 x 8 x 768 x 2 bytes = 201 MB


def child(folder: str, steps: int) -> None:
    import lightning as L
    import torch

    from crosscoder.module import CrosscoderModule
    from data.datamodule import ActivationDataModule
    torch.set_num_threads(2)
    dm = ActivationDataModule(folder, batch_size=B, shuffle_buffer=BUFFER, val_shards=1, num_workers=0)
    dm.setup()
    module = CrosscoderModule(S, D, d_sae=F, snapshot_names=dm.snapshot_names, norm_scale=dm.norm_scale(),
                              data_mean=dm.raw_mean())
    L.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module, datamodule=dm)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def write_shards(folder: Path, n_shards: int) -> None:
    import numpy as np

    from data.format import DatasetWriter, Snapshot
    rng = np.random.default_rng(0)
    block = rng.standard_normal((T, S, D)).astype(np.float32)
    with DatasetWriter(folder, model="bench", hook_point="bench", snapshots=[Snapshot(f"step{i}", i) for i in range(S)],
                       d_model=D, tokens_per_sample=T, dtype="float16", samples_per_shard=64) as w:
        for i in range(64 * n_shards):
            w.write(block * (1 + 0.01 * (i % 7)), np.arange(T), doc=i, start=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    params = S * D * F * 2 + F + S * D
    estimate = {"parameters": 4 * params, "gradients": 4 * params, "adam_state": 8 * params,
                "batch_and_activations": 4 * B * (S * D * 3 + F * 3), "shuffle_buffer": 2 * BUFFER * S * D}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_shards in (2, 8):
            folder = Path(tmp) / f"shards{n_shards}"
            write_shards(folder, n_shards)
            out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(folder), "--steps", str(args.steps)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
            rows.append({"shards": n_shards, "peak_rss_bytes": peak})
    total = sum(estimate.values())
    for r in rows:
        r["vs_estimate"] = round(r["peak_rss_bytes"] / total, 3)
        print(f"{r['shards']} shards: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB = {r['vs_estimate']:.2f}x the "
              f"estimate {total / 2**30:.2f} GiB")
    print("estimate: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items()))
    out = ROOT / "bench" / "results" / "memory.json"
    out.write_text(json.dumps({"shape": f"S={S} D={D} F={F} B={B}", "estimate_bytes": estimate,
                               "estimate_total_bytes": total, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
