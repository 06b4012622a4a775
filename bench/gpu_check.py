"""A few real steps of experiment=paper_pythia160m on one CUDA GPU, measured against bench/scale.py's model.

    bash bench/gpu_check.sh                 # CUDA: 32 random-weight snapshots of Pythia-160M's shape, d_sae 98,304
    python -m bench.gpu_check --cpu-smoke   # the same pipeline at tiny shapes on CPU (< 1 min; tests/test_scale.py)

No hub access: ONE random GPT-NeoX with pythia-160m's config (vocab 50,304, d_model 768, 12 layers, 12 heads,
rotary 25%, parallel residual) and a byte-level BPE tokenizer trained on the offline stdlib corpus are saved to a
temp folder, and the paper's 32 revisions step0..step143000 are symlinks to it (model.repo points there,
corpus=stdlib). The run is the preset's (live data, 32 snapshots resident in bf16, the paper's 4,096-token batch
in one step, bf16-mixed, crosscoder=paper at d_sae 98,304) with validation and checkpoints off. Random weights give
a dense code, so the crosscoder takes its dense path (crosscoder/paper_loop.py), the one of the first steps of a
real run; the sparse one is timed by bench/step.py --paper. Measured: the peak allocated GPU
memory (torch.cuda.max_memory_allocated), the snapshot models' forward throughput (their run() timed with CUDA
synchronisation) and the crosscoder step's (training batches timed from start to end), and the whole run's
tokens/s; printed beside the model's predictions for the same configuration; written to
bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048,
                   use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            rotary_pct=0.25, max_position_embeddings=64, use_parallel_residual=True)
# the smoke run: the preset's pipeline at tiny shapes, on 4 of the 32 revisions (all 32 symlinks exist)
SMOKE_OVERRIDES = ["data.snapshots=[step0,step128,step8000,step143000]", "model.d_model=32", "model.layer=1",
                   "model.context_length=64", "crosscoder.d_sae=512",
                   "data.batch_size=64", "+trainer.accumulate_grad_batches=2", "data.block_tokens=1024",
                   "data.norm_tokens=1024", "data.forward_batch=4", "trainer.accelerator=cpu", "data.device=cpu"]


def build_suite(folder: Path, config: dict, revisions: list[str], vocab: int) -> Path:
    """One random GPT-NeoX and a tokenizer in folder/_model; every revision a symlink to it."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.corpus import TextCorpus
    from data.tiny_suite import train_tokenizer
    corpus = TextCorpus("stdlib", max_docs=200, cache_dir=str(folder / "hf"))
    tokenizer = train_tokenizer([t for _, t in corpus.texts()], vocab_size=vocab)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**config)).to(torch.bfloat16)
    target = folder / "_model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    for r in revisions:
        os.symlink(target, folder / r)
    return folder


def run(cpu_smoke: bool, steps: int, workdir: str | None) -> dict:
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from bench import scale
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        base = scale.compose(["experiment=paper_pythia160m"])
        t0 = time.perf_counter()
        suite = build_suite(tmp / "suite", TINY if cpu_smoke else PYTHIA_160M, list(base.model.paper_revisions),
                            vocab=500 if cpu_smoke else 8192)
        overrides = ["experiment=paper_pythia160m", f"model.repo={suite}", "corpus=stdlib",
                     f"corpus.cache_dir={tmp / 'hf'}", "data.val_tokens=8192", f"paths.cache_dir={tmp}",
                     "data.keep_val_bytes=0"] + (SMOKE_OVERRIDES if cpu_smoke else [])
        cfg = scale.compose(overrides)
        shape = scale.shape_from_config(cfg)
        prediction = scale.predict(shape, "H200 141GB")
        built = time.perf_counter() - t0
        if not cpu_smoke:
            torch.cuda.reset_peak_memory_stats()
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        loaded = time.perf_counter() - t0 - built
        module = instantiate(cfg.crosscoder, n_snapshots=datamodule.n_snapshots, d_model=datamodule.d_model,
                             snapshot_names=datamodule.snapshot_names, norm_scale=datamodule.norm_scale(),
                             data_mean=datamodule.raw_mean())

        def sync():
            if not cpu_smoke:
                torch.cuda.synchronize()

        timing = {"forward_s": 0.0, "forward_tokens": 0, "step_s": 0.0, "step_tokens": 0, "sparse_batches": 0,
                  "batches": 0, "routes": set()}
        models_run = datamodule.models.run

        def timed_run(ids, *args, **kwargs):
            sync()
            t = time.perf_counter()
            out = models_run(ids, *args, **kwargs)
            sync()
            timing["forward_s"] += time.perf_counter() - t
            timing["forward_tokens"] += out.shape[0] * out.shape[1]
            return out
        datamodule.models.run = timed_run
        forward = module.crosscoder.forward

        def counted_forward(x):
            out = forward(x)
            timing["batches"] += 1
            timing["sparse_batches"] += out.active is not None
            timing["routes"].add("dense" if out.active is None else "listed" if out.active.window_listed else "passed")
            return out
        module.crosscoder.forward = counted_forward
        k = int(cfg.trainer.get("accumulate_grad_batches") or 1)
        warm = 1  # optimiser steps left out of the step timing (cuBLAS, allocator warm-up)

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync()
                self.t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync()
                if batch_idx >= warm * k:
                    timing["step_s"] += time.perf_counter() - self.t
                    timing["step_tokens"] += batch.shape[0]

        trainer = instantiate(cfg.trainer, max_steps=steps, limit_val_batches=0, logger=False, callbacks=[Timer()],
                              enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp / "run"))
        t1 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        sync()
        fit_s = time.perf_counter() - t1
        measured_peak = torch.cuda.max_memory_allocated() if not cpu_smoke else None
    S, F = shape.S, shape.F
    p_sparse, p_dense = prediction["paths"]["passed"], prediction["paths"]["dense"]
    # the path most batches took (random-weight models: the code is dense at initialisation, as in a real run)
    path = "dense" if "dense" in timing["routes"] else ("passed" if "passed" in timing["routes"] else "listed")
    predicted_phases = {k_: v for k_, v in prediction["paths"][path]["phases"].items() if k_ != "validation"}
    fwd_tps_pred = scale.GPUS["H200 141GB"]["bf16_flops"] * scale.FORWARD_EFFICIENCY / prediction["forward_flops_per_token"]
    result = {
        "device": torch.cuda.get_device_name() if not cpu_smoke else "cpu (smoke: tiny shapes)",
        "S": S, "D": shape.D, "F": F, "micro_batch": shape.micro_batch, "accumulate": k, "optimiser_steps": steps,
        "path": path, "sparse_batches": timing["sparse_batches"], "batches": timing["batches"],
        "build_suite_s": built, "load_models_and_statistics_s": loaded, "fit_s": fit_s,
        "measured_peak_bytes": measured_peak, "predicted_peak_bytes": max(predicted_phases.values()),
        "predicted_phases": predicted_phases,
        "forward_tokens_per_s": timing["forward_tokens"] / max(timing["forward_s"], 1e-9),
        "predicted_forward_tokens_per_s": fwd_tps_pred,
        "step_tokens_per_s": timing["step_tokens"] / max(timing["step_s"], 1e-9),
        "predicted_step_tokens_per_s": shape.batch / prediction["paths"][path]["step_seconds"],
        "predicted_step_tokens_per_s_dense": shape.batch / p_dense["step_seconds"],
        "predicted_step_tokens_per_s_passed": shape.batch / p_sparse["step_seconds"],
        "run_tokens_per_s": steps * shape.batch / fit_s,
    }
    # the sparse path with the window passed, as the preset runs once the code is sparse: one measured step at the
    # preset's shape (the smoke: a small one) of bench/scale.py's own setup, against the model
    device = "cpu" if cpu_smoke else "cuda"
    sp_shape = (4, 32, 2048, 256) if cpu_smoke else (S, shape.D, F, shape.batch)
    # free the fit's crosscoder (77 GB of state at d_sae 98,304), models and buffers before the next one is built
    del trainer, module, datamodule, timed_run, counted_forward
    forward = models_run = None  # the bound methods the closures held  # noqa: F841
    gc.collect()
    if not cpu_smoke:
        torch.cuda.empty_cache()
    t = time.perf_counter()
    m = scale.measure_step(*sp_shape, "passed", device)
    timed = scale.measure_step_time(*sp_shape, "passed", device)
    result["passed_step"] = {"shape": sp_shape, "route": m["route"], "measured_peak_bytes": m["peak_bytes"],
                             "predicted_peak_bytes": scale.model_for(m)["peak_bytes"],
                             "measured_tokens_per_s": sp_shape[3] / timed,
                             "predicted_tokens_per_s": sp_shape[3] / p_sparse["step_seconds"] if not cpu_smoke else None,
                             "seconds": time.perf_counter() - t}
    return result


def report(r: dict) -> None:
    def gb(b):
        return "n/a (CPU)" if b is None else f"{b / 1e9:.2f} GB"
    print(f"\n{r['device']}: S={r['S']} D={r['D']} d_sae={r['F']}, micro-batch {r['micro_batch']} x {r['accumulate']}, "
          f"{r['optimiser_steps']} optimiser steps, crosscoder path: {r['path']} "
          f"({r['sparse_batches']} of {r['batches']} batches sparse)")
    print(f"setup: suite {r['build_suite_s']:.0f} s, models + statistics {r['load_models_and_statistics_s']:.0f} s, "
          f"fit {r['fit_s']:.0f} s")
    print("| quantity | measured | predicted (bench/scale.py, H200) |\n|---|---|---|")
    print(f"| peak allocated memory | {gb(r['measured_peak_bytes'])} | {gb(r['predicted_peak_bytes'])} |")
    print(f"| snapshot forwards, tokens/s (all {r['S']} models) | {r['forward_tokens_per_s']:,.0f} | "
          f"{r['predicted_forward_tokens_per_s']:,.0f} |")
    print(f"| crosscoder step, tokens/s ({r['path']} path) | {r['step_tokens_per_s']:,.0f} | "
          f"{r['predicted_step_tokens_per_s']:,.0f} (dense {r['predicted_step_tokens_per_s_dense']:,.0f}, "
          f"passed {r['predicted_step_tokens_per_s_passed']:,.0f}) |")
    print(f"| whole fit, tokens/s (incl. the first block's forwards) | {r['run_tokens_per_s']:,.0f} | |")
    p = r["passed_step"]
    pred = "" if p["predicted_tokens_per_s"] is None else f"{p['predicted_tokens_per_s']:,.0f}"
    print(f"| sparse step (window passed), S D F B = {p['shape']}: peak allocated | {gb(p['measured_peak_bytes'])} | "
          f"{gb(p['predicted_peak_bytes'])} |")
    print(f"| sparse step (window passed): tokens/s | {p['measured_tokens_per_s']:,.0f} | {pred} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the pipeline, not the GPU")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 4 on CUDA, 2 in the smoke)")
    parser.add_argument("--workdir", default=None, help="where the temporary suite goes (default: the system's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/gpu_check: no CUDA device (torch.cuda.is_available() is False). This check needs one GPU "
              "(H100/H200); use --cpu-smoke to test its pipeline on CPU.", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.cpu_smoke else 4)
    r = run(args.cpu_smoke, steps, args.workdir)
    report(r)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "gpu_check_smoke.json" if args.cpu_smoke else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
