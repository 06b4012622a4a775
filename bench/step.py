"""Training-step throughput of the crosscoder against this machine's matmul roofline and a plain reference.

    python bench/step.py [--quick]

For each shape (S, D, F) at batch B it measures, in one run:
- the dense matmul rate of this machine for the step's own GEMM shapes (fp32 and bf16), the roofline;
- a plain reference step as other libraries write it (per-snapshot einsums for encoder and decoder);
- our step (Crosscoder forward + loss_terms + backward + Adam) for relu / jumprelu / topk, fp32 and bf16
  autocast (fp32 master weights).
FLOPs per step = 10 * B * S * D * F: forward encoder and decoder (2 + 2), encoder weight gradient (2),
decoder input and weight gradients (2 + 2); the input needs no gradient. Writes bench/results/step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def our_step(S: int, D: int, F: int, B: int, activation: str, bf16: bool, sparse_topk: bool | None = None):
    model = Crosscoder(S, D, F, activation=activation, k=32, sparse_topk=sparse_topk)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as CrosscoderModule configures it
    x = torch.randn(B, S, D)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            terms = model.loss_terms(x, out)
            loss = terms.mse + terms.sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape only, one repeat (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shapes = [(8, 128, 4096)] if args.quick else [(8, 128, 4096), (8, 768, 16384)]
    B = 256 if args.quick else 1024
    rows = []
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
        for activation in ("relu", "jumprelu", "topk"):
            for precision in ("float32", "bfloat16"):
                t = timed(our_step(S, D, F, B, activation, precision == "bfloat16"), repeats)
                rows.append(dict(shape=f"S={S} D={D} F={F}", variant=activation, precision=precision,
                                 tokens_per_s=B / t, gflops=flops / t / 1e9,
                                 roofline_frac=flops / t / 1e9 / roof["float32"], speedup_vs_reference=ref / t))
        t = timed(our_step(S, D, F, B, "topk", False, sparse_topk=False), repeats)  # the dense path it replaces
        rows.append(dict(shape=f"S={S} D={D} F={F}", variant="topk, dense path", precision="float32",
                         tokens_per_s=B / t, gflops=flops / t / 1e9, roofline_frac=flops / t / 1e9 / roof["float32"],
                         speedup_vs_reference=ref / t))
        for r in rows:
            r.setdefault("roofline_gflops_fp32", roof["float32"])
            r.setdefault("roofline_gflops_bf16", roof["bfloat16"])
    ev32, ev16 = ev_after_training(False), ev_after_training(True)
    print(f"{'shape':22}{'variant':24}{'precision':10}{'tok/s':>10}{'GFLOP/s':>9}{'of fp32 roof':>13}{'vs ref':>8}")
    for r in rows:
        print(f"{r['shape']:22}{r['variant']:24}{r['precision']:10}{r['tokens_per_s']:>10,.0f}{r['gflops']:>9.1f}"
              f"{r['roofline_frac']:>13.0%}{r['speedup_vs_reference']:>8.2f}")
    print(f"matmul roofline: " + ", ".join(f"{r['shape']}: fp32 {r['roofline_gflops_fp32']:.0f} / bf16 "
                                         f"{r['roofline_gflops_bf16']:.0f} GFLOP/s" for r in rows[::8]))
    print(f"explained variance after 150 steps: float32 {ev32:.4f}, bfloat16 autocast {ev16:.4f} (diff {ev16 - ev32:+.4f})")
    out = ROOT / "bench" / "results" / ("step_quick.json" if args.quick else "step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": B, "flops_per_step": "10*B*S*D*F", "threads": torch.get_num_threads(),
                               "rows": rows, "ev_float32": ev32, "ev_bfloat16": ev16}, indent=1))


if __name__ == "__main__":
    main()
