"""K dictionaries per activation stream against K separate runs: tokens per second for the whole sweep.

    python -m bench.dictionaries [--k 4] [--steps 200] [--d-sae 1024]

Both sides train the same K dictionaries (different l1_coef) for the same steps on the same shards,
with the real datamodule and Lightning Trainer; only the sharing of the stream differs.
Writes bench/results/dictionaries.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import lightning as L  # noqa: E402
import torch  # noqa: E402

from crosscoder.module import CrosscoderModule  # noqa: E402
from data.datamodule import ActivationDataModule  # noqa: E402
from tests.conftest import write_toy_dataset  # noqa: E402


def fit(dataset: Path, l1_coefs: list[float], steps: int, d_sae: int, batch_size: int) -> float:
    dm = ActivationDataModule(dataset, batch_size=batch_size, shuffle_buffer=8 * batch_size, num_workers=1)
    dm.setup()
    module = CrosscoderModule(dm.n_snapshots, dm.d_model, d_sae=d_sae, l1_coef=l1_coefs,
                              snapshot_names=dm.snapshot_names, norm_scale=dm.norm_scale(), data_mean=dm.raw_mean())
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(2)
    coefs = [0.5 * 2 ** i for i in range(args.k)]
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_toy_dataset(Path(tmp) / "data", n_samples=400, tokens_per_sample=128, n_snapshots=4,
                                    d_model=64, n_features=256, samples_per_shard=50, dtype="float16")
        shared = fit(dataset, coefs, args.steps, args.d_sae, args.batch_size)
        separate = sum(fit(dataset, [c], args.steps, args.d_sae, args.batch_size) for c in coefs)
    tokens = args.k * args.steps * args.batch_size  # dictionary-tokens trained on each side
    result = {"k": args.k, "steps": args.steps, "d_sae": args.d_sae, "batch_size": args.batch_size,
              "shape": "S=4, D=64", "shared_seconds": round(shared, 2), "separate_seconds": round(separate, 2),
              "shared_tokens_per_s": round(tokens / shared), "separate_tokens_per_s": round(tokens / separate),
              "speedup": round(separate / shared, 2), "threads": torch.get_num_threads()}
    print(f"{'':24}{'seconds':>10}{'dict-tokens/s':>16}")
    print(f"{'K on one stream':24}{shared:>10.1f}{tokens / shared:>16,.0f}")
    print(f"{'K separate runs':24}{separate:>10.1f}{tokens / separate:>16,.0f}")
    print(f"speed-up of one stream: {separate / shared:.2f}x (K={args.k})")
    out = ROOT / "bench" / "results" / "dictionaries.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
