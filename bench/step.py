"""Training-step throughput of the crosscoder against this machine's matmul roofline and a plain reference.

    python -m bench.step [--quick]
    python -m bench.step --crossover [--shape S D F]   # where the sparse relu step stops winning
    python -m bench.step --paper [--quick] [--threads N]   # the paper activation: sparse path vs dense path
    python -m bench.step --activations relu jumprelu   # only these rows (with the reference): step_relu_jumprelu.json

For each shape (S, D, F) at batch B it measures, in one run:
- the dense matmul rate of this machine for the step's own GEMM shapes (fp32 and bf16), the roofline;
- a plain reference step as other libraries write it (per-snapshot einsums for encoder and decoder);
- our step (Crosscoder forward + loss_terms + backward + Adam) for relu / jumprelu / topk, fp32 and bf16
  autocast (fp32 master weights);
- the sparse paths (crosscoder/sparse.py) against the dense path they replace, side by side: TopK k=32 against
  the same step forced dense; relu / jumprelu with b_enc shifted so that L0 = 48 latents are open per token (a
  trained dictionary's L0) against the relu / jumprelu rows above, which take the dense path (at init about
  half of the latents are open; the dense step costs the same at any L0). jumprelu takes the window and initial
  threshold of conf/crosscoder/jumprelu.yaml; its sparse step also carries the closed entries inside the window.
With --paper: crosscoder=paper with ~40 latents open per token and snapshot (thresholds set from the measured
pre-activations), its sparse step against its dense step (time and peak transient memory, each measured in a fresh
process) and against the dense relu step; see paper_bench.
FLOPs per step = 10 * B * S * D * F: forward encoder and decoder (2 + 2), encoder weight gradient (2),
decoder input and weight gradients (2 + 2); the input needs no gradient. Writes bench/results/step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--paper" in sys.argv:
    # Idle OpenMP threads sleep instead of spinning (read before torch starts its thread pool). On this shared
    # machine the default spin made the sparse paper step 1.33 s instead of 0.17 s at 2 threads (dense relu 0.57 vs
    # 0.33 s): every small parallel region waited for a second thread that the other jobs kept off a core.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from crosscoder.model import Crosscoder  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_rate(B: int, SD: int, F: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of the step's GEMMs: [B, SD] x [SD, F], [B, F] x [F, SD] and the weight-gradient product."""
    a, w, g = torch.randn(B, SD, dtype=dtype), torch.randn(SD, F, dtype=dtype), torch.randn(B, F, dtype=dtype)

    def gemms():
        a @ w
        g @ w.T
        a.T @ g
    return 3 * 2 * B * SD * F / timed(gemms, repeats) / 1e9


def reference_step(S: int, D: int, F: int, B: int):
    """A plain crosscoder step: einsum encoder/decoder, L1 weighted by summed decoder norms, Adam."""
    W_enc = torch.nn.Parameter(torch.randn(S, D, F) * 0.01)
    W_dec = torch.nn.Parameter(torch.randn(F, S, D) * 0.01)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(F)), torch.nn.Parameter(torch.zeros(S, D))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    x = torch.randn(B, S, D)

    def step():
        f = torch.relu(torch.einsum("bsd,sdf->bf", x, W_enc) + b_enc)
        recon = torch.einsum("bf,fsd->bsd", f, W_dec) + b_dec
        loss = (recon - x).pow(2).sum((1, 2)).mean() + (f * W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def jumprelu_preset() -> dict:
    """The straight-through window and initial threshold of conf/crosscoder/jumprelu.yaml (the window sets how
    many closed entries the sparse path carries)."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "conf" / "crosscoder" / "jumprelu.yaml")
    return dict(jumprelu_init_threshold=float(cfg.jumprelu_init_threshold), jumprelu_bandwidth=float(cfg.jumprelu_bandwidth))


def our_step(S: int, D: int, F: int, B: int, activation: str, bf16: bool, sparse: bool | None = None,
             l0: int | None = None):
    """One training step of Crosscoder; ``sparse`` as the model's switch; ``l0``: shift b_enc so that about
    this many latents are open per token (relu / jumprelu; at init about half of them are)."""
    model = Crosscoder(S, D, F, activation=activation, k=32, sparse=sparse,
                       **(jumprelu_preset() if activation == "jumprelu" else {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as CrosscoderModule configures it
    x = torch.randn(B, S, D)
    if l0 is not None:
        with torch.no_grad():  # the (1 - l0 / F) quantile of the pre-activations, from 64 tokens
            pre = model.encode_pre(x[:64]).flatten()
            model.b_enc.fill_(-pre.kthvalue(int(len(pre) * (1 - l0 / F))).values.item())
            if activation == "jumprelu":  # its gate is pre * sum_s ||W_dec[i, s]|| > t: open the same l0 latents
                model.b_enc.add_(model.log_threshold.exp() / model.decoder_norms().sum(-1))

    return training_step(model, x, opt, bf16)


def training_step(model: Crosscoder, x: torch.Tensor, opt: torch.optim.Optimizer, bf16: bool,
                  sparsity_weight: float = 1.0):
    """A closure for one step as CrosscoderModule takes it, in Lightning's order: forward (bf16 autocast on x's
    device, or none), mse + sparsity_weight * sparsity, zero_grad(set_to_none), backward, Adam; it returns the
    forward's output."""
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            terms = model.loss_terms(x, out)
            loss = terms.mse + sparsity_weight * terms.sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return out
    return step


def ev_after_training(bf16: bool, steps: int = 150) -> float:
    """Explained variance on held-out tokens after the same steps on the same sparse synthetic data."""
    from crosscoder.metrics import ExplainedVariance
    g = torch.Generator().manual_seed(0)
    S, D, F_true = 4, 64, 256
    dirs = torch.nn.functional.normalize(torch.randn(F_true, S, D, generator=g), dim=-1)

    def batch(n):
        code = (torch.rand(n, F_true, generator=g) < 0.02) * torch.rand(n, F_true, generator=g) * 3
        return torch.einsum("bf,fsd->bsd", code, dirs)
    torch.manual_seed(0)
    model = Crosscoder(S, D, 1024, dec_init_norm=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = batch(1024)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            terms = model.loss_terms(x, out)
            loss = terms.mse + 0.3 * terms.sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
    ev = ExplainedVariance(S, D)
    with torch.no_grad():
        x = batch(8192)
        ev.update(x, model(x).recon)
    return float(ev.overall())


def crossover(S: int, D: int, F: int, B: int = 1024, repeats: int = 2) -> None:
    """The relu step, dense and sparse (forced) at several L0, interleaved so that they share the machine's load;
    the fastest of ``repeats`` steps each. Sets crosscoder.sparse.MAX_DENSITY. Writes bench/results/step_crossover.json."""
    steps = {"dense": our_step(S, D, F, B, "relu", False, sparse=False, l0=F // 16)}
    for l0 in (48, F // 32, F // 16, F // 8):
        steps[f"L0={l0}"] = our_step(S, D, F, B, "relu", False, sparse=True, l0=l0)
    best = {}
    for name, step in steps.items():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    rows = [dict(variant=f"relu sparse {name}" if name != "dense" else "relu dense path", seconds=t,
                 speedup_vs_dense=best["dense"] / t) for name, t in best.items()]
    for r in rows:
        print(f"S={S} D={D} F={F} B={B}  {r['variant']:24}{r['seconds']:8.2f} s{r['speedup_vs_dense']:7.2f}x")
    out = ROOT / "bench" / "results" / "step_crossover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": dict(S=S, D=D, F=F, B=B), "rows": rows}, indent=1))


def paper_model(S: int, D: int, F: int, B: int, sparse: bool | None, open_per_snapshot: int = 40,
                bandwidth: float = 0.001, seed: int = 0):
    """A paper crosscoder and a batch x [B, S, D] with about ``open_per_snapshot`` latents open per token and
    snapshot. Decoder norms differ per (latent, snapshot) (x U[0.5, 1.5]), so the open sets differ between
    snapshots; the one threshold t (all latents) is the (1 - open / F) quantile of g = pre * ||W_dec[i, s]|| over
    the first 64 tokens. ``bandwidth``: the threshold's straight-through window."""
    torch.manual_seed(seed)
    model = Crosscoder(S, D, F, activation="paper", jumprelu_bandwidth=bandwidth, sparse=sparse)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
        g = (model.encode_pre(x[:64])[:, None, :] * model.decoder_norms().T).flatten()
        t = g.kthvalue(int(len(g) * (1 - open_per_snapshot / F))).values.item()
        model.log_threshold.fill_(float(torch.tensor(t).log()))
    return model, x


def paper_density(model: Crosscoder, x: torch.Tensor, bandwidth: float | None = None, chunk: int = 64) -> dict:
    """Per token and snapshot, over the whole batch: open entries, closed entries inside the window of ``bandwidth``
    (None: the model's); and the L0 of ``latents`` (latents open at some snapshot). Counted in chunks of tokens."""
    bw = model.jumprelu_bandwidth if bandwidth is None else bandwidth
    n_open = n_window = n_any = 0
    with torch.no_grad():
        norms, t = model.decoder_norms().T, model.log_threshold.exp()
        for i in range(0, len(x), chunk):
            g = model.encode_pre(x[i:i + chunk])[:, None, :] * norms
            open_ = g > t
            n_open += int(open_.sum())
            n_window += int((((g - t).abs() < bw / 2) & ~open_).sum())
            n_any += int(open_.any(1).sum())
    B, S = x.shape[:2]
    return dict(open_per_snapshot=n_open / (B * S), window_per_snapshot=n_window / (B * S), l0=n_any / B)


def paper_step(S: int, D: int, F: int, B: int, variant: str):
    """(step, model, x) for variant "paper sparse" / "paper passed" / "paper dense" (fp32), "paper sparse bf16",
    "relu dense"."""
    if variant == "relu dense":
        model = Crosscoder(S, D, F, activation="relu", sparse=False)
        x = torch.randn(B, S, D)
    else:
        # "paper passed": the paper's own bandwidth 2, whose window holds nearly every entry: the sparse path lists the
        # open entries and passes the window (crosscoder/paper_loop.py); the other paper variants a narrow window
        model, x = paper_model(S, D, F, B, sparse=False if "dense" in variant else None,
                               bandwidth=2.0 if "passed" in variant else 0.001)
    bf16 = variant.endswith("bf16")
    # a tiny learning rate: the update costs the same, and the code's density stays where it was set
    opt = torch.optim.Adam(model.parameters(), lr=1e-7, fused=True)
    return training_step(model, x, opt, bf16), model, x


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def paper_memory_child(S: int, D: int, F: int, B: int, variant: str, threads: int) -> None:
    """In a fresh process: after a warm-up step (gradients and Adam state exist), reset the peak RSS and run one
    step; print the peak over the RSS before it (the step's transient memory) as JSON."""
    import gc
    torch.set_num_threads(threads)
    step = paper_step(S, D, F, B, variant)[0]
    out = step()
    sparse_ran = out.active is not None
    del out
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    print(json.dumps(dict(transient_bytes=(_rss_kib("VmHWM") - before) * 1024, held_bytes=before * 1024,
                          sparse_ran=sparse_ran)))


def paper_memory(S: int, D: int, F: int, B: int, variant: str) -> dict:
    import subprocess
    # large blocks straight from mmap and back on free, so that RSS follows what the step holds
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "bench.step", "--paper-memory-child", str(S), str(D), str(F), str(B), variant,
           str(torch.get_num_threads())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def paper_bench(quick: bool, repeats: int = 3) -> None:
    """crosscoder=paper at ~40 open latents per token and snapshot. Shape 1 (S=32 D=128 F=16384): the sparse step
    against the dense paper step, time and transient memory. Shape 2 (S=4 D=128 F=4096, batch 1024): the sparse step,
    fp32 and bf16 autocast, against the dense relu fp32 step. Steps of one shape are interleaved (each repeat runs
    every variant once) and the fastest of ``repeats`` is kept (2 at the first shape, whose dense step is slow).
    Writes bench/results/step_paper[_quick][_threadsN].json (N: --threads, when not 2)."""
    plans = [((8, 64, 4096), 256, ["paper sparse", "paper passed", "paper dense"]),
             ((4, 64, 2048), 512, ["paper sparse", "paper passed", "paper sparse bf16", "relu dense"])] if quick else \
            [((32, 128, 16384), 256, ["paper sparse", "paper passed", "paper dense"]),
             ((4, 128, 4096), 1024, ["paper sparse", "paper passed", "paper sparse bf16", "relu dense", "paper dense"])]
    rows = []
    for (S, D, F), B, variants in plans:
        steps, ran = {}, {}
        for v in variants:
            steps[v] = paper_step(S, D, F, B, v)
            ran[v] = steps[v][0]().active is not None  # warm-up; which path the model took
        times = {v: [] for v in variants}
        for _ in range(repeats if S * F < 2 ** 17 else 2):
            for v in variants:
                start = time.perf_counter()
                steps[v][0]()
                times[v].append(time.perf_counter() - start)
        model, x = steps[variants[0]][1:]
        density = paper_density(model, x)
        wide = paper_density(model, x[:256], bandwidth=2.0)["window_per_snapshot"]  # conf/crosscoder/paper.yaml's
        del steps
        for v in variants:
            t = min(times[v])
            mem = paper_memory(S, D, F, B, v)
            assert mem["sparse_ran"] == ran[v]
            rows.append(dict(shape=f"S={S} D={D} F={F}", batch=B, variant=v, sparse_path=ran[v], seconds=t,
                             seconds_all=times[v], tokens_per_s=B / t, transient_bytes=mem["transient_bytes"],
                             held_bytes=mem["held_bytes"], **(density if v.startswith("paper") else {}),
                             window_per_snapshot_at_bandwidth_2=wide if v.startswith("paper") else None))
    print(f"{'shape':22}{'B':>6}  {'variant':20}{'path':>7}{'s/step':>8}{'tok/s':>9}{'transient':>11}"
          f"{'open/snap':>10}{'window/snap':>12}{'L0':>7}")
    for r in rows:
        print(f"{r['shape']:22}{r['batch']:>6}  {r['variant']:20}{'sparse' if r['sparse_path'] else 'dense':>7}"
              f"{r['seconds']:>8.3f}{r['tokens_per_s']:>9,.0f}{r['transient_bytes'] / 2**20:>9,.0f} MiB"
              + (f"{r['open_per_snapshot']:>10.1f}{r['window_per_snapshot']:>12.2f}{r['l0']:>7.1f}"
                 if "l0" in r else ""))
    by = {(r["shape"], r["variant"]): r for r in rows}
    (s1, _), (s2, _) = [(f"S={S} D={D} F={F}", B) for (S, D, F), B, _ in plans]
    sp, de = by[s1, "paper sparse"], by[s1, "paper dense"]
    summary = dict(
        speedup_vs_dense_paper=de["seconds"] / sp["seconds"],
        transient_memory_ratio=de["transient_bytes"] / max(sp["transient_bytes"], 1),
        sparse_paper_vs_dense_relu_tokens=by[s2, "paper sparse"]["tokens_per_s"] / by[s2, "relu dense"]["tokens_per_s"],
        paper_bf16_vs_fp32_tokens=by[s2, "paper sparse bf16"]["tokens_per_s"] / by[s2, "paper sparse"]["tokens_per_s"],
        passed_speedup_vs_dense_paper=de["seconds"] / by[s1, "paper passed"]["seconds"],
        passed_transient_memory_ratio=de["transient_bytes"] / max(by[s1, "paper passed"]["transient_bytes"], 1),
        passed_paper_vs_dense_relu_tokens=by[s2, "paper passed"]["tokens_per_s"] / by[s2, "relu dense"]["tokens_per_s"])
    print(f"{s1}: sparse paper step {summary['speedup_vs_dense_paper']:.2f}x faster than the dense paper step "
          f"(target >= 3x), {summary['transient_memory_ratio']:.1f}x less transient memory (target >= 8x)")
    print(f"{s2}: sparse paper fp32 {summary['sparse_paper_vs_dense_relu_tokens']:.2f}x the tokens/s of dense relu "
          f"fp32 (target >= 1.2x); paper bf16 {summary['paper_bf16_vs_fp32_tokens']:.2f}x paper fp32 (target >= 1.6x)")
    print(f"at the paper's bandwidth 2 (window passed): {summary['passed_speedup_vs_dense_paper']:.2f}x faster than "
          f"the dense paper step and {summary['passed_transient_memory_ratio']:.1f}x less transient memory ({s1}); "
          f"{summary['passed_paper_vs_dense_relu_tokens']:.2f}x the tokens/s of dense relu fp32 ({s2})")
    print(f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print("window entries per token and snapshot at conf/crosscoder/paper.yaml's bandwidth 2.0 (first 256 tokens): "
          + ", ".join(f"{r['shape']}: {r['window_per_snapshot_at_bandwidth_2']:,.0f}" for r in rows
                      if r["variant"] == "paper sparse"))
    threads = torch.get_num_threads()
    out = ROOT / "bench" / "results" / (("step_paper_quick" if quick else "step_paper")
                                        + ("" if threads == 2 else f"_threads{threads}") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                               "repeats": repeats, "rows": rows, "summary": summary}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape only, one repeat (a smoke test)")
    parser.add_argument("--crossover", action="store_true", help="sparse vs dense relu step at several L0")
    parser.add_argument("--shape", type=int, nargs=3, default=(8, 768, 16384), metavar=("S", "D", "F"))
    parser.add_argument("--paper", action="store_true", help="crosscoder=paper: sparse vs dense step, time and memory")
    parser.add_argument("--activations", nargs="+", choices=("relu", "jumprelu", "topk"), default=None,
                        help="only these rows (and the reference); no EV check; writes step_<activations>.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2; --paper only)")
    parser.add_argument("--paper-memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_memory_child:
        *dims, variant, threads = args.paper_memory_child
        return paper_memory_child(*map(int, dims), variant, int(threads))
    torch.set_num_threads(args.threads if args.paper else 2)
    if args.crossover:
        return crossover(*args.shape)
    if args.paper:
        return paper_bench(args.quick)
    shapes = [(8, 128, 4096)] if args.quick else [(8, 128, 4096), (8, 768, 16384)]
    B = 256 if args.quick else 1024
    rows = []
    L0 = 48
    for S, D, F in shapes:
        big = D * F > 1e7
        repeats = 1 if args.quick else (2 if big else 5)
        flops = 10 * B * S * D * F
        roof = {"float32": matmul_rate(B, S * D, F, torch.float32, repeats),
                "bfloat16": matmul_rate(B, S * D, F, torch.bfloat16, repeats)}
        ref = timed(reference_step(S, D, F, B), repeats)
        rows.append(dict(shape=f"S={S} D={D} F={F}", variant="reference einsum relu", precision="float32",
                         tokens_per_s=B / ref, gflops=flops / ref / 1e9, roofline_frac=flops / ref / 1e9 / roof["float32"],
                         speedup_vs_reference=1.0))
        activations = args.activations or ("relu", "jumprelu", "topk")
        for activation in activations:
            for precision in ("float32", "bfloat16"):
                t = timed(our_step(S, D, F, B, activation, precision == "bfloat16"), repeats)
                rows.append(dict(shape=f"S={S} D={D} F={F}", variant=activation, precision=precision,
                                 tokens_per_s=B / t, gflops=flops / t / 1e9,
                                 roofline_frac=flops / t / 1e9 / roof["float32"], speedup_vs_reference=ref / t))
        # the TopK row above took the sparse path
        sparse_rows = [("topk, dense path", "topk", False, None)] if "topk" in activations else []
        sparse_rows += [(f"{a} L0={L0}, sparse", a, None, L0) for a in ("relu", "jumprelu") if a in activations]
        for variant, activation, sparse, l0 in sparse_rows:
            t = timed(our_step(S, D, F, B, activation, False, sparse=sparse, l0=l0), repeats)
            rows.append(dict(shape=f"S={S} D={D} F={F}", variant=variant, precision="float32", tokens_per_s=B / t,
                             gflops=flops / t / 1e9, roofline_frac=flops / t / 1e9 / roof["float32"],
                             speedup_vs_reference=ref / t))
        for r in rows:
            r.setdefault("roofline_gflops_fp32", roof["float32"])
            r.setdefault("roofline_gflops_bf16", roof["bfloat16"])
    ev32, ev16 = (ev_after_training(False), ev_after_training(True)) if not args.activations else (None, None)
    print(f"{'shape':22}{'variant':28}{'precision':10}{'tok/s':>10}{'GFLOP/s':>9}{'of fp32 roof':>13}{'vs ref':>8}")
    for r in rows:
        print(f"{r['shape']:22}{r['variant']:28}{r['precision']:10}{r['tokens_per_s']:>10,.0f}{r['gflops']:>9.1f}"
              f"{r['roofline_frac']:>13.0%}{r['speedup_vs_reference']:>8.2f}")
    print("matmul roofline: " + ", ".join(f"{r['shape']}: fp32 {r['roofline_gflops_fp32']:.0f} / bf16 "
                                         f"{r['roofline_gflops_bf16']:.0f} GFLOP/s" for r in rows
                                         if r["variant"].startswith("reference")))
    fp32 = {(r["shape"], r["variant"]): r for r in rows if r["precision"] == "float32"}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for sparse_variant, dense_variant in [("topk", "topk, dense path"), (f"relu L0={L0}, sparse", "relu"),
                                              (f"jumprelu L0={L0}, sparse", "jumprelu")]:
            if (shape, sparse_variant) not in fp32:
                continue
            fast, slow = fp32[shape, sparse_variant], fp32[shape, dense_variant]
            fast["sparse_speedup"] = fast["tokens_per_s"] / slow["tokens_per_s"]
            print(f"sparse vs dense path, {shape}, {sparse_variant}: {fast['sparse_speedup']:.2f}x")
    if ev32 is not None:
        print(f"explained variance after 150 steps: float32 {ev32:.4f}, bfloat16 autocast {ev16:.4f} (diff {ev16 - ev32:+.4f})")
    name = "step_" + "_".join(args.activations) if args.activations else "step"
    out = ROOT / "bench" / "results" / (f"{name}_quick.json" if args.quick else f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": B, "flops_per_step": "10*B*S*D*F", "threads": torch.get_num_threads(), "sparse_l0": L0,
                               "rows": rows, "ev_float32": ev32, "ev_bfloat16": ev16}, indent=1))


if __name__ == "__main__":
    main()
