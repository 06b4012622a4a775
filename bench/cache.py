"""Caching throughput against the bare forward passes of the same snapshots, and bytes per token on disk.

    python -m bench.cache [--tokens 262144] [--snapshots 4]

Saves a GPT-NeoX of the mini-Pythia shape (d_model 128, 4 layers) as several local revisions, caches the
stdlib corpus through data.cache.ensure_cached (the real path: tokenise, forward to the hook, float16,
chunk buffer, shards, sha256, manifest), and in the same run times the bare forward passes over the same
windows (to the same hook, same batch size). On a shared machine the two runs can see different loads, so it
also times what the bare side does inside the caching run (the same ``load_snapshot`` and ``activations``
calls, wrapped in a timer): the overhead over those is measured under one load. Writes bench/results/cache.json.
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
from omegaconf import OmegaConf  # noqa: E402

import data.cache  # noqa: E402
from data.cache import bytes_per_token, ensure_cached  # noqa: E402
from data.corpus import TextCorpus  # noqa: E402
from data.snapshots import activations, load_snapshot, load_tokenizer  # noqa: E402


def make_suite(root: Path, n: int, corpus: TextCorpus) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.tiny_suite import train_tokenizer
    tokenizer = train_tokenizer([t for _, t in corpus.texts()], vocab_size=4096)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=512, rotary_pct=0.25))
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"step{i}")
        tokenizer.save_pretrained(root / f"step{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--snapshots", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = TextCorpus("stdlib", max_docs=400, cache_dir=str(tmp / "hf"))
        make_suite(tmp / "suite", args.snapshots, corpus)
        revisions = [f"step{i}" for i in range(args.snapshots)]
        model_cfg = OmegaConf.create(dict(name="bench", repo=str(tmp / "suite"), revisions=revisions, layer=2,
                                          hook="resid_post", d_model=128, context_length=128, build=None))
        cache_cfg = OmegaConf.create(dict(n_tokens=args.tokens, dtype="float16", drop_first=1, samples_per_shard=128,
                                          chunk_tokens=1 << 20, batch_size=64, model_dtype="float32", device="cpu"))
        forward_s = 0.0

        def timed(fn):
            def call(*args, **kwargs):
                nonlocal forward_s
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                forward_s += time.perf_counter() - t
                return out
            return call
        data.cache.activations, data.cache.load_snapshot = timed(activations), timed(load_snapshot)
        start = time.perf_counter()
        folder = ensure_cached(model_cfg, cache_cfg, corpus, tmp / "cache")
        cache_s = time.perf_counter() - start
        data.cache.activations, data.cache.load_snapshot = activations, load_snapshot

        tokenizer = load_tokenizer(str(tmp / "suite"), "step0")
        n_windows = -(-args.tokens // 127)
        windows = [w.tokens for w in corpus.windows(tokenizer, 128, max_tokens=n_windows * 128)]
        ids = torch.from_numpy(np.stack(windows)).long()
        start = time.perf_counter()
        for revision in revisions:
            model = load_snapshot(str(tmp / "suite"), revision)
            for i in range(0, len(ids), 64):
                activations(model, ids[i:i + 64], 2, "resid_post")
        bare_s = time.perf_counter() - start
        per_token, floor = bytes_per_token(folder)
    tokens = n_windows * 127 * args.snapshots
    result = {"snapshots": args.snapshots, "tokens_per_snapshot": n_windows * 127, "cache_seconds": round(cache_s, 2),
              "bare_forward_seconds": round(bare_s, 2), "cache_tokens_per_s": round(tokens / cache_s),
              "bare_tokens_per_s": round(tokens / bare_s), "overhead": round(cache_s / bare_s - 1, 3),
              "forward_seconds_in_cache_run": round(forward_s, 2),
              "overhead_over_own_forwards": round(cache_s / forward_s - 1, 3),
              "bytes_per_token": round(per_token, 1), "floor_bytes_per_token": floor,
              "bytes_vs_floor": round(per_token / floor, 4)}
    print(f"caching:       {result['cache_tokens_per_s']:,} snapshot-tokens/s ({cache_s:.1f} s)")
    print(f"bare forwards: {result['bare_tokens_per_s']:,} snapshot-tokens/s ({bare_s:.1f} s)")
    print(f"loads + forwards inside the caching run: {forward_s:.1f} s (overhead over them {cache_s / forward_s - 1:.1%})")
    print(f"overhead {result['overhead']:.1%}; {per_token:.1f} bytes/token on disk = {per_token / floor:.4f}x the floor {floor}")
    out = ROOT / "bench" / "results" / "cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
