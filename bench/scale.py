"""Memory and time model of a crosscoder run at any scale, validated by measurement.

    python -m bench.scale                    # validate on this machine (CPU; CUDA too when present), then predict
    python -m bench.scale --predict-only     # the predictions for the paper presets only (no measurement)

The model (every term from the shapes and the code that allocates it):

  persistent   parameters W_enc [S,D,F], W_dec [F,S,D], b_enc [F], b_dec [S,D], log_threshold [F] in fp32 (Lightning's
               bf16-mixed keeps fp32 master weights), their gradients (alive from one backward to the next
               zero_grad, which Lightning calls after the forward) and Adam's exp_avg / exp_avg_sq (fp32):
               16 bytes per parameter.
  step         the crosscoder step's peak transient tensors (crosscoder/model.py, crosscoder/sparse.py), per path:
               dense "paper" (one gate per snapshot): [B,S,F] tensors at the forward's peak (g = pre * norm, the gates,
               the per-snapshot code and its bf16 copy for the decoder GEMM, the penalty's three), [B,F] ones and the
               bf16 copy of W_dec; sparse "paper": [B,F] pre-activations and masks, 38 + 40 bytes per kept
               (token, snapshot, latent) entry, and in the backward one W_dec-sized fp32 temporary (the decoder
               norm's gradient) beside the new gradients.
  snapshot     the S GPT-NeoX snapshot models truncated after the hooked layer (embedding + layers 0..L), in
  models       data.model_dtype; resident on the device, or one at a time (data.placement=rotate).
  live data    the block buffer [block_tokens + one window, S, D] in data.buffer_dtype (data/live.py writes the
               models' outputs into it in place), the block's permutation, the batch and the kept validation
               activations (<= data.keep_val_bytes), and the snapshot model's forward transients (hidden states and
               the MLP's [tokens, 4D]).

Time: GEMM FLOPs at a stated fraction of the GPU's published dense bf16 rate, plus the bytes that memory-bound
passes move (Adam, gradient fills, the [B,S,F] element-wise passes of the dense path) at a fraction of its
published bandwidth, plus the snapshot models' forwards. Validation: the step's peak allocated bytes measured
at several scaled-down shapes (CPU: every allocation and free of the CPU allocator, recorded by torch.profiler
with profile_memory; CUDA: torch.cuda.max_memory_allocated) against the model. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GB = 1e9
GIB = 1 << 30

# Published figures (NVIDIA data sheets): dense bf16 tensor-core rate (no sparsity), HBM capacity and bandwidth.
GPUS = {
    "H100 SXM 80GB": dict(memory=80e9, bf16_flops=989e12, bandwidth=3.35e12),
    "H200 141GB": dict(memory=141e9, bf16_flops=989e12, bandwidth=4.8e12),
}
# Efficiencies (stated, not measured here: no GPU on this machine; bench/gpu_check.sh measures them).
# GEMMs: large bf16 GEMMs reach ~60-70% of the H100's 989 TFLOP/s in practice; the crosscoder's dense step reached
# 90-93% of this machine's own GEMM roofline (docs/PERFORMANCE.md section 1): 0.65 x 0.9 ~ 0.55 of the published peak.
GEMM_EFFICIENCY = 0.55
# Snapshot models: d_model 768 GEMMs and attention are smaller and less efficient than the crosscoder's.
FORWARD_EFFICIENCY = 0.35
# Memory-bound passes (fused Adam, fills, element-wise kernels) stream at ~80% of the published bandwidth.
BANDWIDTH_EFFICIENCY = 0.8

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# GPT-NeoX shapes of the suites (config.json of EleutherAI/pythia-*): vocabulary, layers, heads, MLP width = 4 D.
NEOX = {
    "pythia160m": dict(vocab=50304, d_model=768, n_layers=12, n_heads=12),
    "pythia6.9b": dict(vocab=50432, d_model=4096, n_layers=32, n_heads=32),
    "pythia70m": dict(vocab=50304, d_model=512, n_layers=6, n_heads=8),
    "pythia410m": dict(vocab=50304, d_model=1024, n_layers=24, n_heads=16),
    "pythia1b": dict(vocab=50304, d_model=2048, n_layers=16, n_heads=8),
}


# ---- parameters ------------------------------------------------------------------------------------------------
def crosscoder_params(S: int, D: int, F: int, activation: str = "paper") -> dict:
    """Element counts of the crosscoder's parameters (crosscoder/model.py)."""
    p = {"W_enc": S * D * F, "W_dec": F * S * D, "b_enc": F, "b_dec": S * D}
    if activation in ("jumprelu", "paper"):
        p["log_threshold"] = F
    return p


def neox_truncated_params(vocab: int, d_model: int, n_layers_kept: int, intermediate: int | None = None) -> int:
    """Parameters of a GPT-NeoX after data.live.truncate_after: embed_in, layers 0..L, final_layer_norm (kept, never
    run), no unembedding. Per layer: 2 LayerNorms (2 x 2D), QKV (3D^2 + 3D), attention output (D^2 + D), MLP
    (D x 4D + 4D, 4D x D + D)."""
    D, H = d_model, intermediate or 4 * d_model
    per_layer = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)
    return vocab * D + n_layers_kept * per_layer + 2 * D


# ---- the crosscoder step's memory ---------------------------------------------------------------------------------
def persistent_bytes(S: int, D: int, F: int, activation: str = "paper", param_bytes: int = 4) -> dict:
    """Parameters, gradients and fused Adam's two moments, all in the parameters' dtype (fp32 under bf16-mixed)."""
    n = sum(crosscoder_params(S, D, F, activation).values())
    return {"params": n * param_bytes, "grads": n * param_bytes, "adam": 2 * n * param_bytes, "n_params": n}


PATHS = ("dense", "listed", "passed")  # crosscoder/model.py _forward_paper's three implementations


def step_transient_bytes(S: int, D: int, F: int, B: int, path: str, autocast: bool = True,
                         entries_per_token_snapshot: float = 0.0, pairs_per_token: float | None = None) -> dict:
    """Peak bytes the paper crosscoder's step allocates above the persistent state (parameters, gradients, Adam).

    Common: pre [B,F] fp32 (saved; the bf16 GEMM output beside it while the bias is added) and latents [B,F] fp32
    (an output, alive through the backward); under autocast the encoder GEMM's bf16 copies of W_enc [S*D,F] and
    x [B,S*D], saved for its backward on the dense path.
    path "dense" (crosscoder/paper_loop.py paper_dense; every [B,S,F] quantity one snapshot at a time), the larger
      of the encoder GEMM (as below) and the backward's peak at one snapshot: besides pre, latents and grad_pre and
      its next value (4 each), the gates (open, window: 1 each), the code f, dL/df and the penalty's derivative
      (4 each), the bf16 GEMM output and the element-wise chain's temporaries: 49 bytes per [B,F] element measured
      at the [B,F]-dominated validation shapes; plus the batch's bf16 copy (saved by the encoder GEMM for W_enc's
      gradient; W_enc's own bf16 copy is not saved, x needing no gradient) and one W_dec[:, s] slice.
    path "listed" (crosscoder/sparse.py, the window's entries listed), the largest of:
      the encoder GEMM: W_enc's bf16 cast [S*D,F] (autocast; not a leaf, not cached) and the bf16 output [B,F];
      the bias add: the output converted to fp32 and the fp32 sum (with the bf16 output: 10 bytes per [B,F]);
      the entries: pre and the latents (fp32) and the candidate mask (bool), 9 bytes per [B,F], plus per kept
        (token, snapshot, latent) entry N = entries x B x S: cand, rows, snaps, cols (int64), pre (fp32), open and
        window (bool) = 38 bytes, and values, bag index, tanh and index temporaries (36 bytes); per candidate
        (token, latent) pair cand_rows, cand_cols, cand_pre (20 bytes); the expansion chunk (candidates x S,
        padded, at most sparse._EXPAND_CHUNK elements, ~20 bytes each);
      the backward: pre and the latents (8 bytes per [B,F]) and the entries, with the encoder gradient's CSR
        operand (pairs x 20 bytes, F x 16).
    path "passed" (the open entries listed; the closed window entries by paper_loop's pass): as "listed" with the
      open entries only, and the window pass, which runs first in the backward: pre and latents (8 bytes per
      [B,F]), and per snapshot g - t (4), the two masks and their AND (3), the masked pre (4) and its GEMM-dtype
      copy (2): 21 bytes per [B,F] element (on CUDA the pass is one compiled kernel: 8 + 2)."""
    bf, sdf = B * F, S * D * F
    gemm = (2 * sdf + 2 * bf) if autocast else 4 * bf
    if path == "dense":
        bwd = 49 * bf + (2 * B * S * D if autocast else 0) + 4 * F * D + 8 * B * S * D
        return {"peak": max(gemm, bwd), "forward": gemm, "backward": bwd}
    if path not in ("listed", "passed"):
        raise ValueError(f"path: '{path}' is not one of {PATHS}")
    N = entries_per_token_snapshot * B * S
    C = pairs_per_token * B if pairs_per_token is not None else min(N, bf)
    # paper_entries expands the candidates padded to the most any token has (taken as 1.5x the mean), in chunks of
    # at most sparse._EXPAND_CHUNK elements, ~20 bytes each (g, t, the masks, the gathered norms and indices)
    chunk = 20 * min(1 << 22, 1.5 * C * S)
    add = 10 * bf if autocast else 8 * bf
    entries = 9 * bf + 74 * N + 20 * C + chunk
    fwd = max(gemm, add, entries) + 6 * B * S * D
    bwd = 8 * bf + 74 * N + 20 * C + 16 * F + 6 * B * S * D
    if path == "passed":
        bwd = max(bwd, 74 * N + 20 * C + (21 if autocast else 19) * bf + 8 * B * S * D)
    return {"peak": max(fwd, bwd), "forward": fwd, "backward": bwd}


# ---- the live data's memory ----------------------------------------------------------------------------------------
def live_bytes(S: int, D: int, context: int, block_tokens: int, batch: int, buffer_dtype: str, model_dtype: str,
               model_params: int, forward_batch: int, val_tokens: int, keep_val_bytes: int, placement: str,
               n_heads: int, drop_first: int = 1) -> dict:
    """data/live.py on the device: the snapshot models, the block buffer (the models write into it in place, so one
    copy while a block is built, beside one forward's transients), the block permutation (int64), the batch gather
    (buffer dtype) and its fp32 copy, the kept validation activations, and one forward's transients (hidden states
    [fb, T, D] x 4 and the MLP's [fb, T, 4D] x 2 in the model dtype; attention by SDPA kernels, no [T, T])."""
    T = context - drop_first
    buf, mdt = DTYPE_BYTES[buffer_dtype], DTYPE_BYTES[model_dtype]
    block = (block_tokens + T) * S * D * buf
    windows = -(-val_tokens // T)
    val = windows * T * S * D * buf
    models = model_params * mdt * (S if placement == "resident" else 1)
    forward = forward_batch * context * D * mdt * (4 + 2 * 4)
    batch_bytes = batch * S * D * (buf + 4) + block_tokens * 8
    return {"models": models, "block": block, "block_build": block + forward, "batch": batch_bytes,
            "val_kept": val if val <= keep_val_bytes else 0, "forward": forward}


# ---- FLOPs and time --------------------------------------------------------------------------------------------------
def forward_flops_per_token(model_params_kept_nonembed: int, n_layers_kept: int, D: int, context: int) -> float:
    """One snapshot model's forward to the hook: 2 x (non-embedding parameters) + causal attention scores and values
    (2 x 2 x T/2 x D per layer on average over positions)."""
    return 2 * model_params_kept_nonembed + n_layers_kept * 2 * context * D


# Bytes moved per [B, S, F] element by the element-wise kernels of a step (read + written, counted op by op in the
# code; ops on [F]-sized vectors neglected). On CUDA each snapshot's element-wise work is one torch.compile'd kernel
# (crosscoder/paper_loop.py), on CPU (and if compiling fails) eager kernels:
#   dense (paper_loop.paper_dense), compiled: forward pre read (4), the any-open mask read and written (2), the code
#     written in bf16 and read by the decoder GEMM (4); backward pre read (4), dL/df's GEMM output written and read
#     (4), grad_pre read and written (8), the code written and read by W_dec's gradient GEMM (4): ~30. Eager ~300:
#     forward ~80 (gates, the code, its bf16 copy, the tanh chain, the mask), backward ~220 (the gates again, the
#     GEMM output's fp32 copy, the penalty's derivative chain, the norms' term, grad_pre, the threshold's estimate);
#   passed (the closed window entries' pass, paper_loop.closed_window_pre, once per snapshot in the backward),
#     compiled: pre read (4), the masked pre written in bf16 (2), read by the GEMM (2): 8. Eager: g - t (16), the
#     masks (13), the masked pre (9), its bf16 copy (6), the GEMM's read (2): 46.
ELEMENTWISE_BYTES = {"dense": 30, "dense_eager": 300, "passed": 8, "passed_eager": 46}


def step_time(S: int, D: int, F: int, B: int, micro: int, path: str, gpu: dict, entries_per_token_snapshot: float = 0.0,
              pairs_per_token: float = 0.0, devices: int = 1, compiled: bool = True) -> dict:
    """Seconds per optimiser step of B tokens in micro-batches of ``micro`` (trainer.accumulate_grad_batches = B /
    micro): GEMM FLOPs at GEMM_EFFICIENCY of the bf16 peak plus memory traffic at BANDWIDTH_EFFICIENCY of the bandwidth.

    Traffic in bytes per W_enc-sized element (S*D*F fp32 elements; W_dec has as many):
      per optimiser step: fused Adam reads p, g, m, v and writes p, m, v of both matrices (2 x 28);
      per micro-batch, sparse paths: W_enc's bf16 cast (4 read + 2 written) and the GEMM's read of it (2); decoder
        norms read twice (2 x 4); W_dec's gradient formed in its own layout with the norms' term folded in (W_dec
        read 4, gradient written 4); W_enc's gradient written (4); with accumulation both new gradients are added
        into .grad (2 x 12): 28 (+ 24);
      per micro-batch, dense path: W_enc's bf16 cast and the GEMM's read (8); per snapshot W_dec's slice cast to bf16
        for three GEMMs (3 x 6); the gradients written (2 x 4) and W_dec read for the norms' term (4); decoder norms
        (8): 46 (+ 24).
    FLOPs per token: dense: 10 S D F (encoder, decoder, dL/df, W_dec's and W_enc's gradients); listed: the encoder
    GEMM (2 S D F) and per kept entry a D-row gather and scatter (6 D FLOPs, 12 D bytes), per candidate pair a row of
    x read for the encoder gradient (4 S D bytes), and ~40 bytes per [B, F] element (pre, masks, latents); passed:
    listed's over the open entries, plus the window pass's GEMM (2 S D F) and its element-wise bytes
    (ELEMENTWISE_BYTES; ``compiled`` False: the eager kernels, for the dense path too). Under FSDP (``devices`` > 1)
    each device runs B / devices tokens, its Adam shard, and all-gathers the bf16 weights twice and reduce-scatters the bf16
    gradients once per micro-batch (3 x 2 bytes x 2 S D F, at ~350 GB/s of NVLink per device)."""
    sdf = S * D * F
    k = max(1, B // (micro * devices))  # micro-batches per device per optimiser step
    accum = 24 if k > 1 else 0
    b = B / devices  # tokens per device per step
    if path == "dense":
        flops = 10 * b * sdf
        traffic = (2 * 28 * sdf / devices + k * (46 + accum) * sdf + 40 * b * F
                   + ELEMENTWISE_BYTES["dense" if compiled else "dense_eager"] * b * S * F)
    elif path in ("listed", "passed"):
        N = entries_per_token_snapshot * b * S
        flops = 2 * b * sdf + 6 * N * D
        traffic = (2 * 28 * sdf / devices + k * (28 + accum) * sdf + 12 * N * D + 4 * pairs_per_token * b * S * D
                   + 40 * b * F)
        if path == "passed":  # the window pass: its GEMM, its element-wise bytes, and a read of W_dec per micro-batch
            flops += 2 * b * sdf
            traffic += ELEMENTWISE_BYTES["passed" if compiled else "passed_eager"] * b * S * F + k * 4 * sdf
    else:
        raise ValueError(f"path: '{path}' is not one of {PATHS}")
    t_flops = flops / (gpu["bf16_flops"] * GEMM_EFFICIENCY)
    t_mem = traffic / (gpu["bandwidth"] * BANDWIDTH_EFFICIENCY)
    t_comm = 0.0 if devices == 1 else k * 3 * 2 * 2 * sdf * (devices - 1) / devices / 350e9
    return {"flops": flops, "traffic_bytes": traffic, "seconds": t_flops + t_mem + t_comm, "gemm_s": t_flops,
            "memory_s": t_mem, "comm_s": t_comm}


def fits_micro_batch(run: "RunShape", gpu_name: str, path: str = "dense", headroom: float = 0.9, **kw) -> int | None:
    """The largest power-of-two micro-batch (dividing the batch) whose predicted peak is within ``headroom`` of the
    GPU's memory (the rest for the allocator's fragmentation, the CUDA context and cuBLAS workspaces)."""
    best, micro = None, 1
    while micro <= run.batch:
        if run.batch % micro == 0:
            trial = RunShape(**{**asdict(run), "micro_batch": micro})
            if predict(trial, gpu_name, **kw)["paths"][path]["peak_bytes"] <= headroom * GPUS[gpu_name]["memory"]:
                best = micro
        micro *= 2
    return best


# ---- a whole preset ----------------------------------------------------------------------------------------------------
@dataclass
class RunShape:
    name: str
    model: str
    S: int
    D: int
    F: int
    batch: int  # tokens per optimiser step
    micro_batch: int  # tokens per forward/backward (batch / trainer.accumulate_grad_batches)
    tokens: int
    layer: int
    context: int
    block_tokens: int
    buffer_dtype: str
    model_dtype: str
    val_tokens: int
    keep_val_bytes: int
    forward_batch: int
    placement: str
    devices: int = 1  # FSDP shards of the crosscoder state (1: one device)


def shape_from_config(cfg, d_sae: int | None = None) -> RunShape:
    """The RunShape of a composed train config (live data keys; conf/data/live.yaml's defaults for data=shards)."""
    d, t = cfg.data, cfg.trainer
    accumulate = int(t.get("accumulate_grad_batches", 1) or 1)
    devices = int(t.devices) if "strategy" in t and int(t.devices) > 0 else 1
    S = len(d.snapshots) if d.get("snapshots") is not None else len(cfg.model.revisions)
    return RunShape(
        name=str(cfg.model.name), model=str(cfg.model.name), S=S, D=int(cfg.model.d_model),
        F=int(d_sae or cfg.crosscoder.d_sae), batch=int(d.batch_size) * accumulate * devices,
        micro_batch=int(d.batch_size), tokens=int(cfg.cache.n_tokens), layer=int(cfg.model.layer),
        context=int(cfg.model.context_length), block_tokens=int(d.get("block_tokens", 65536)),
        buffer_dtype=str(d.get("buffer_dtype", "float32")), model_dtype=str(d.get("model_dtype", "float32")),
        val_tokens=int(d.get("val_tokens", 131072)), keep_val_bytes=int(d.get("keep_val_bytes", 2 << 30)),
        forward_batch=int(d.get("forward_batch", 64)), placement=str(d.get("placement", "auto")), devices=devices)


FORWARD_EFFICIENCY_WIDE = 0.5  # d_model >= 2048 (Pythia-6.9B): large GEMMs, closer to the crosscoder's efficiency
HOST_TO_DEVICE = 20e9  # bytes/s moving a snapshot model host -> device (data.placement=rotate; pageable, PCIe 5)


def predict(run: RunShape, gpu_name: str = "H200 141GB", entries_per_token_snapshot: float = 64.0,
            pairs_per_token: float | None = None, open_per_token_snapshot: float = 40.0) -> dict:
    """Peak memory per device and hours for the whole run, for each path of the paper crosscoder, as if every step
    took it (the dense path runs while the code is dense, from initialisation; "passed" once few entries are open,
    at the paper's wide window; "listed" at a narrow window). ``hours_per_dense_percent``: what each 1% of the steps
    on the dense path adds to the "passed" run.

    Densities (stated, not measured: no trained paper crosscoder at this scale here): "listed" keeps
    ``entries_per_token_snapshot`` entries per token and snapshot (default 64: ~40 open plus window entries) from
    ``pairs_per_token`` candidate pairs (default twice that); "passed" lists the open entries only,
    ``open_per_token_snapshot`` (default 40: the issue's "~40 open latents per snapshot", the paper's L0 of 30-40),
    from 1.2x as many pairs (a latent open at some snapshot of a token is open at most of them)."""
    gpu = GPUS[gpu_name]
    arch = NEOX[run.model]
    kept = run.layer + 1
    mparams = neox_truncated_params(arch["vocab"], run.D, kept)
    nonembed = mparams - arch["vocab"] * run.D
    placement = run.placement
    if placement == "auto":  # as data/live.py decides it
        placement = "resident" if mparams * DTYPE_BYTES[run.model_dtype] * run.S <= gpu["memory"] / 4 else "rotate"
    pers = persistent_bytes(run.S, run.D, run.F)
    n = pers.pop("n_params")
    shard = sum(pers.values()) / run.devices
    # FSDP with one unit: the whole bf16 weights are gathered for forward and backward and the whole bf16 gradient
    # exists before its reduce-scatter
    fsdp_full = 0 if run.devices == 1 else 2 * n * 2
    data = live_bytes(run.S, run.D, run.context, run.block_tokens, run.micro_batch, run.buffer_dtype, run.model_dtype,
                      mparams, run.forward_batch, run.val_tokens, run.keep_val_bytes, placement, arch["n_heads"])
    T = run.context - 1
    val_chunk = 2 * run.forward_batch * T * run.S * run.D * DTYPE_BYTES[run.buffer_dtype]  # acts + pending (live.py)
    pairs = pairs_per_token if pairs_per_token is not None else 2 * entries_per_token_snapshot
    held = shard + fsdp_full + data["models"] + data["val_kept"]
    density = {path: (entries_per_token_snapshot, pairs) for path in PATHS}
    density["passed"] = (open_per_token_snapshot, 1.2 * open_per_token_snapshot)
    paths = {}
    for path in PATHS:
        n_entries, n_pairs = density[path]
        tr = step_transient_bytes(run.S, run.D, run.F, run.micro_batch, path,
                                  entries_per_token_snapshot=n_entries, pairs_per_token=n_pairs)["peak"]
        phases = {"step": held + data["block"] + data["batch"] + tr,
                  "block_build": held + data["block_build"],
                  "validation": held + data["block"] + (0 if data["val_kept"] else val_chunk) + tr}
        peak = max(phases.values())
        t = step_time(run.S, run.D, run.F, run.batch, run.micro_batch, path, gpu, n_entries, n_pairs,
                      run.devices)
        paths[path] = {"peak_bytes": peak, "phases": phases, "step_transient": tr, "fits": peak <= gpu["memory"],
                       "step_seconds": t["seconds"], "gemm_s": t["gemm_s"], "memory_s": t["memory_s"],
                       "comm_s": t["comm_s"]}
    steps = math.ceil(run.tokens / run.batch)
    eff = FORWARD_EFFICIENCY_WIDE if run.D >= 2048 else FORWARD_EFFICIENCY
    fwd_flops_token = run.S * forward_flops_per_token(nonembed, kept, run.D, run.context)
    fwd_s = run.tokens * fwd_flops_token / (gpu["bf16_flops"] * eff) / run.devices
    rotate_s = 0.0
    if placement == "rotate":  # every block moves the S models host -> device, on every device
        blocks = run.tokens / run.devices / run.block_tokens
        rotate_s = blocks * run.S * mparams * DTYPE_BYTES[run.model_dtype] / HOST_TO_DEVICE
    hours = {path: (steps * paths[path]["step_seconds"] + fwd_s + rotate_s) / 3600 for path in paths}
    for path in ("passed", "dense"):  # with the eager element-wise kernels (CPU, or torch.compile unavailable)
        eager = step_time(run.S, run.D, run.F, run.batch, run.micro_batch, path, gpu, *density[path], run.devices,
                          compiled=False)["seconds"]
        hours[f"{path}_eager"] = (steps * eager + fwd_s + rotate_s) / 3600
    per_dense_percent = steps / 100 * (paths["dense"]["step_seconds"] - paths["passed"]["step_seconds"]) / 3600
    return {
        "run": asdict(run), "gpu": gpu_name, "placement": placement, "crosscoder_params": n,
        "snapshot_model_params": mparams, "persistent_bytes": shard, "fsdp_full_bytes": fsdp_full,
        "snapshot_models_bytes": data["models"], "block_bytes": data["block"], "val_kept_bytes": data["val_kept"],
        "host_bytes_per_device": mparams * DTYPE_BYTES[run.model_dtype] * run.S if placement == "rotate" else 0,
        "paths": paths, "steps": steps, "activation_disk_bytes_live": 0,
        "activation_disk_bytes_shards": run.tokens * run.S * run.D * 2,  # float16 cache, 800M tokens x S x D
        "forward_flops_per_token": fwd_flops_token, "forward_hours": fwd_s / 3600, "rotate_hours": rotate_s / 3600,
        "hours": hours, "hours_per_dense_percent": per_dense_percent,
        "entries_per_token_snapshot": entries_per_token_snapshot, "open_per_token_snapshot": open_per_token_snapshot,
    }


# ---- measurement ----------------------------------------------------------------------------------------------------
def _paper_setup(S: int, D: int, F: int, B: int, path: str, device: str, open_per_snapshot: int = 16, seed: int = 0):
    """A paper crosscoder and a batch, for each path of crosscoder/model.py's _forward_paper:
    dense: the preset's init (threshold 0.1, bandwidth 2: every entry in the window, a third open), forced dense;
    listed: bandwidth 0.001 (the window's entries few enough to list) and the threshold set so that about
      ``open_per_snapshot`` latents are open per token and snapshot (a trained code's density);
    passed: the paper's bandwidth 2 (nearly every entry in the window) at that density: the open entries listed, the
      window by crosscoder/paper_loop.py's pass (what the preset runs once the code is sparse)."""
    import torch

    from crosscoder.model import Crosscoder
    if path not in ("dense", "listed", "passed"):
        raise ValueError(f"path: '{path}' is not dense, listed or passed")
    torch.manual_seed(seed)
    bandwidth = 0.001 if path == "listed" else 2.0
    cc = Crosscoder(S, D, F, activation="paper", jumprelu_init_threshold=0.1, jumprelu_bandwidth=bandwidth,
                    sparse=False if path == "dense" else None)
    x = torch.randn(B, S, D)
    if path != "dense":
        with torch.no_grad():
            cc.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
            g = (cc.encode_pre(x[:32])[:, None, :] * cc.decoder_norms().T).flatten()
            t = g.kthvalue(int(len(g) * (1 - open_per_snapshot / F))).values.item()
            cc.log_threshold.fill_(math.log(t))
    return cc.to(device), x.to(device)


def _state_bytes(cc, opt) -> int:
    b = sum(p.numel() * p.element_size() for p in cc.parameters())
    b += sum(p.grad.numel() * p.grad.element_size() for p in cc.parameters() if p.grad is not None)
    for st in opt.state.values():
        b += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
    return b


def _paper_training_step(S: int, D: int, F: int, B: int, path: str, device: str, autocast: bool = True):
    """(crosscoder, batch, step): one training step in Lightning's order (forward under autocast, zero_grad
    (set_to_none), backward, fused Adam step), returning the forward's output."""
    import torch

    from bench.step import training_step
    cc, x = _paper_setup(S, D, F, B, path, device)
    opt = torch.optim.Adam(cc.parameters(), lr=1e-5, fused=True)
    step = training_step(cc, x, opt, bf16=autocast, sparsity_weight=0.3)
    step.optimizer = opt
    return cc, x, step


def measure_step(S: int, D: int, F: int, B: int, path: str, device: str = "cpu", autocast: bool = True) -> dict:
    """Peak allocated bytes of the paper crosscoder's training step, in Lightning's order (forward under autocast,
    zero_grad(set_to_none), backward, fused Adam step), after a warm-up step (gradients and Adam state exist).

    CPU: torch.profiler(profile_memory=True) records every allocation and free of the CPU allocator with its time;
    the running sum over the last of two profiled steps, from its start, is the step's transient peak (the first
    profiled step frees the blocks allocated before profiling began, whose frees the profiler cannot size). Plus the
    state that exists at the step's start (parameters, gradients, Adam moments, the batch), summed from the tensors.
    CUDA: torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from crosscoder import sparse as sp
    cc, x, step = _paper_training_step(S, D, F, B, path, device, autocast)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    out = step()
    took_sparse = out.active is not None
    route = "dense" if not took_sparse else "listed" if out.active.window_listed else "passed"
    n_entries = len(out.active.rows) if took_sparse else 0
    with torch.no_grad():  # the candidate pairs the route expanded (open ones only when the window is passed)
        pre = cc.encode_pre(x)
        bw = 0.0 if route == "passed" else cc.jumprelu_bandwidth
        pairs = int(sp.paper_candidates(pre, cc.decoder_norms(), cc.log_threshold.exp(), bw).sum())
    del out, pre
    state = _state_bytes(cc, step.optimizer) + x.numel() * x.element_size()
    t0 = time.perf_counter()
    if dev_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        transient, total = peak - before, peak
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
            with record_function("measured_step"):
                step()
        events = prof.profiler.kineto_results.events()
        mark = next(e for e in events if e.name() == "measured_step")
        lo, hi = mark.start_ns(), mark.start_ns() + mark.duration_ns()
        running, base, transient = 0, None, 0
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            if base is None and e.start_ns() >= lo:
                base = running
            running += e.nbytes()
            if base is not None and e.start_ns() <= hi:
                transient = max(transient, running - base)
        total = state + transient
    return {"S": S, "D": D, "F": F, "B": B, "path": path, "device": device, "sparse_ran": took_sparse, "route": route,
            "entries_per_token_snapshot": n_entries / (B * S), "pairs_per_token": pairs / B,
            "state_bytes": state, "transient_bytes": transient, "peak_bytes": total,
            "seconds": time.perf_counter() - t0}


def measure_step_time(S: int, D: int, F: int, B: int, path: str, device: str = "cpu", steps: int = 3) -> float:
    """Seconds per training step (forward under bf16 autocast, backward, fused Adam), the mean of ``steps`` after
    one warm-up step (on CUDA also the first call of the compiled window pass)."""
    import torch
    _, _, step = _paper_training_step(S, D, F, B, path, device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    step()
    if dev_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev_type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def model_for(m: dict, autocast: bool = True) -> dict:
    """The model's peak for a measured step: persistent state + the batch + the step's transient peak, at the
    measured density (entries and candidate pairs per token)."""
    pers = sum(v for k, v in persistent_bytes(m["S"], m["D"], m["F"]).items() if k != "n_params")
    tr = step_transient_bytes(m["S"], m["D"], m["F"], m["B"], m["path"], autocast,
                              m["entries_per_token_snapshot"], m["pairs_per_token"])["peak"]
    return {"state_bytes": pers + m["B"] * m["S"] * m["D"] * 4, "transient_bytes": tr,
            "peak_bytes": pers + m["B"] * m["S"] * m["D"] * 4 + tr}


def measure_block(S: int = 4, D: int = 64, context: int = 64, block_tokens: int = 4096, device: str = "cpu") -> dict:
    """Peak bytes of data/live.py's LiveActivationDataModule.block (the real method, on a stand-in holding its
    fields) building a block that starts inside the carried window: one buffer for the block and its windows, written
    in place by the S models, and their forward's transients. Random GPT-NeoX snapshots (2 layers) saved to a temp
    folder."""
    import tempfile
    from types import SimpleNamespace

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.live import LiveActivationDataModule, SnapshotModels
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=256, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=4 * D, max_position_embeddings=context))
        model.save_pretrained(Path(tmp) / "step0")
        for s in range(1, S):
            os.symlink(Path(tmp) / "step0", Path(tmp) / f"step{s}")
        models = SnapshotModels(tmp, [f"step{s}" for s in range(S)], 1, "resid_post", D, torch.float32, device,
                                "resident", forward_batch=4)
        T = context - 1
        stand_in = SimpleNamespace(block_tokens=block_tokens, T=T, models=models, drop_first=1,
                                   buffer_dtype=torch.bfloat16, n_snapshots=S, d_model=D)
        rng = np.random.default_rng(0)
        windows = (rng.integers(0, 256, context) for _ in iter(int, 1))
        k = 1
        g0 = k * block_tokens // T
        carried = (g0, models.run(torch.from_numpy(rng.integers(0, 256, (1, context))).long(), 1, torch.bfloat16))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            tokens, _ = LiveActivationDataModule.block(stand_in, k, windows, g0 + 1, carried)
        running = peak = 0
        for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
    predicted = live_bytes(S, D, context, block_tokens, 1, "bfloat16", "float32", 0, 4, 0, 0, "resident", 4)
    return {"S": S, "D": D, "context": context, "block_tokens": block_tokens, "measured_peak": peak,
            "predicted_block": predicted["block"], "predicted_build": predicted["block_build"], "tokens": len(tokens)}


def check_param_formula() -> list[dict]:
    """neox_truncated_params against GPT-NeoX models built by transformers (meta device: shapes only) and truncated
    by data/live.py's truncate_after: Pythia-160M and -6.9B shapes, and a small one."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.live import truncate_after
    rows = []
    for name, arch, layer in (("pythia160m", NEOX["pythia160m"], 6), ("pythia6.9b", NEOX["pythia6.9b"], 16),
                              ("small", dict(vocab=400, d_model=32, n_layers=3, n_heads=4), 1)):
        with torch.device("meta"):
            model = GPTNeoXForCausalLM(GPTNeoXConfig(
                vocab_size=arch["vocab"], hidden_size=arch["d_model"], num_hidden_layers=arch["n_layers"],
                num_attention_heads=arch["n_heads"], intermediate_size=4 * arch["d_model"], rotary_pct=0.25))
        truncate_after(model, layer)
        actual = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "layer": layer, "actual": actual,
                     "formula": neox_truncated_params(arch["vocab"], arch["d_model"], layer + 1)})
    return rows


VALIDATION_SHAPES = [  # (S, D, F, B): scaled down; S from 4 to 32, B / F and S*D / B varied; the paper's shape is
    # [B, F]-dominated (B F = 4e8 against S D = 24,576), as the first and last are
    (4, 32, 8192, 512), (8, 64, 4096, 256), (16, 32, 4096, 128), (32, 48, 2048, 256), (4, 128, 4096, 1024)]


def validate(device: str = "cpu", shapes=None) -> list[dict]:
    import torch
    rows = []
    for S, D, F, B in shapes or VALIDATION_SHAPES:
        for path in PATHS:
            m = measure_step(S, D, F, B, path, device)
            if m["route"] != path:
                raise RuntimeError(f"validation S={S} D={D} F={F} B={B}: set up for the {path} path, {m['route']} ran")
            p = model_for(m)
            rows.append({**m, "predicted_peak": p["peak_bytes"], "predicted_transient": p["transient_bytes"],
                         "ratio": p["peak_bytes"] / m["peak_bytes"],
                         "transient_ratio": p["transient_bytes"] / max(m["transient_bytes"], 1)})
            print(f"  {device} S={S:<3} D={D:<4} F={F:<5} B={B:<4} {path:<6} ("
                  f"{m['entries_per_token_snapshot']:.1f} entries/token/snapshot)  measured {m['peak_bytes'] / 1e6:7.1f} MB"
                  f"  predicted {p['peak_bytes'] / 1e6:7.1f} MB  ratio {rows[-1]['ratio']:.3f}"
                  f"  (step transient {m['transient_bytes'] / 1e6:6.1f} vs {p['transient_bytes'] / 1e6:6.1f} MB)",
                  flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


PRESETS = {"paper_pythia160m": [32768, 65536, 98304], "paper_pythia6.9b": [32768]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def preset_predictions(preset: str, sizes: list[int] | None = None) -> list[dict]:
    """For each dictionary size of the preset and each GPU: the preset's prediction, and the largest micro-batch at
    which its dense path fits that GPU (for a user who must shrink it)."""
    cfg = compose([f"experiment={preset}"])
    rows = []
    for F in sizes or PRESETS[preset]:
        base = shape_from_config(cfg, F)
        for gpu in GPUS:
            rows.append({"preset": preset, "d_sae": F, "gpu": gpu, "devices": base.devices,
                         "micro_batch": base.micro_batch, "batch": base.batch, "preset_prediction": predict(base, gpu),
                         "dense_fits_micro_batch": fits_micro_batch(base, gpu, "dense")})
    return rows


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def print_predictions(rows: list[dict]) -> None:
    print("\n| preset | d_sae | GPU (devices) | micro-batch x accumulation | peak GB dense / passed | fits | "
          "hours: passed / every step dense (compiled kernels) / the same, eager | + hours per 1% of steps dense | "
          "activation disk: live / shards |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["preset_prediction"]
        d, s, h = p["paths"]["dense"], p["paths"]["passed"], p["hours"]
        k = r["batch"] // (r["micro_batch"] * r["devices"])
        fits = "yes" if d["fits"] and s["fits"] else ("sparse only" if s["fits"] else "no")
        print(f"| {r['preset']} | {r['d_sae']:,} | {r['gpu']} (x{r['devices']}) | {r['micro_batch']:,} x {k} | "
              f"{_gb(d['peak_bytes'])} / {_gb(s['peak_bytes'])} | {fits} | {h['passed']:.1f} / {h['dense']:.1f} / "
              f"{h['passed_eager']:.1f} / {h['dense_eager']:.1f} | {p['hours_per_dense_percent']:.2f} | "
              f"0 / {p['activation_disk_bytes_shards'] / 1e12:.1f} TB |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predict-only", action="store_true", help="skip the measurements")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = {"assumptions": {"gemm_efficiency": GEMM_EFFICIENCY, "forward_efficiency": FORWARD_EFFICIENCY,
                              "forward_efficiency_wide": FORWARD_EFFICIENCY_WIDE,
                              "bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "host_to_device": HOST_TO_DEVICE,
                              "gpus": GPUS}}
    if not args.predict_only:
        t0 = time.perf_counter()
        print("Parameter formula (truncated GPT-NeoX) against transformers' models:")
        result["param_check"] = check_param_formula()
        for r in result["param_check"]:
            print(f"  {r['model']} layer {r['layer']}: formula {r['formula']:,}, model {r['actual']:,}")
        print("Block buffer (data/live.py block(), the real method, CPU):")
        result["block_check"] = measure_block()
        b = result["block_check"]
        print(f"  measured peak {b['measured_peak'] / 1e6:.2f} MB, predicted {b['predicted_build'] / 1e6:.2f} MB (block buffer "
              f"{b['predicted_block'] / 1e6:.2f} MB + one forward's transients)")
        print("Crosscoder step, peak allocated bytes (state at the step's start + the step's transient peak):")
        result["validation"] = {"cpu": validate("cpu")}
        if torch.cuda.is_available():
            result["validation"]["cuda"] = validate("cuda")
        result["validation_seconds"] = time.perf_counter() - t0
    rows = []
    for preset in PRESETS:
        rows += preset_predictions(preset)
    result["predictions"] = rows
    print_predictions(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
