"""crosscoder=jumprelu on planted-feature data (data/synthetic.py): L0, explained variance and how much the
thresholds learn, for a grid of straight-through bandwidths and sparsity coefficients, against relu at a similar L0.

    python -m bench.jumprelu --steps 600 --relu-l1 1 2                 # windows at the preset's threshold lr, relu
    python -m bench.jumprelu --steps 600 --bandwidths 0.001 --threshold-lr-factor 1 --relu-l1   # the old 1x lr
    python -m bench.jumprelu --steps 600 --bandwidths 0.1 --threshold-lr-factor 30 --relu-l1
    python -m bench.jumprelu --steps 1500 --grid l1 --relu-l1 1      # the preset to convergence, against relu
    python -m bench.jumprelu --steps 300 --quick                       # a smoke test

(docs/PERFORMANCE.md section 7; bench/results/jumprelu_grid.json merges the first three, jumprelu_l1.json is the
last.)

The training loop is CrosscoderModule's math without Lightning (Adam, lr warm-up 1%, linear decay over the last
20%, l1_coef warmed up over the first 5%, thresholds at threshold_lr_factor x lr), on batches drawn from the
synthetic generator in memory, normalised as the datamodule does (mean norm sqrt(D) per snapshot, b_dec at the
mean). Writes bench/results/jumprelu[_quick].json.

Threshold learning is reported three ways: the share of (step, latent) pairs whose threshold got a non-zero
gradient (the window |g - t| < bandwidth / 2 held an entry), the mean |d loss / d log t| over steps, and how far
the thresholds moved (median |log t_end - log t_start|).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from crosscoder.metrics import ExplainedVariance  # noqa: E402
from crosscoder.model import Crosscoder  # noqa: E402
from data.synthetic import SyntheticConfig, feature_recovery, make_truth, normalisation, sample_chunk  # noqa: E402


class Data:
    """Normalised synthetic batches: chunk c of the generator is batch c (validation: chunks from 1_000_000 on)."""

    def __init__(self, cfg: SyntheticConfig, batch: int):
        self.truth, self.batch = make_truth(cfg), batch
        scale, mean = normalisation(self.truth, 10_000, 8192)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.mean = torch.tensor(mean, dtype=torch.float32) * self.scale[:, None]

    def raw(self, chunk: int, n: int) -> np.ndarray:
        return sample_chunk(self.truth, chunk, n)[0]

    def get(self, chunk: int, n: int | None = None) -> torch.Tensor:
        return torch.from_numpy(self.raw(chunk, n or self.batch)) * self.scale[:, None]


def train(data: Data, activation: str, l1_coef: float, steps: int, d_sae: int, bandwidth: float = 0.001,
          init_threshold: float = 0.001, threshold_lr_factor: float = 1.0, lr: float = 1e-3, seed: int = 0) -> dict:
    S, D = data.mean.shape
    torch.manual_seed(seed)
    cc = Crosscoder(S, D, d_sae, activation=activation, jumprelu_bandwidth=bandwidth,
                    jumprelu_init_threshold=init_threshold)
    cc.init_b_dec(data.mean)
    thresholds = [p for n, p in cc.named_parameters() if n == "log_threshold"]
    others = [p for n, p in cc.named_parameters() if n != "log_threshold"]
    groups = [{"params": others}] + ([{"params": thresholds, "lr": lr * threshold_lr_factor}] if thresholds else [])
    opt = torch.optim.Adam(groups, lr=lr)
    warm, decay = max(1, int(0.01 * steps)), int(0.8 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else (
        1 - (s - decay) / max(steps - 1 - decay, 1) if s >= decay else 1.0))
    l1_warm = max(1, int(0.05 * steps))
    t_start = cc.log_threshold.detach().clone() if thresholds else None
    fired = torch.zeros(d_sae, dtype=torch.bool)
    got_grad, grad_abs, n_obs = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for step in range(steps):
        x = data.get(step)
        out = cc(x)
        terms = cc.loss_terms(x, out)
        loss = terms.mse + l1_coef * min(1.0, (step + 1) / l1_warm) * terms.sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if thresholds and step >= steps // 10:  # after the warm-ups
            g = cc.log_threshold.grad
            got_grad += float((g != 0).float().mean())
            grad_abs += float(g.abs().mean())
            n_obs += 1
        opt.step()
        sched.step()
        if step >= steps - 100:
            fired |= (out.latents > 0).any(0)
    seconds = time.perf_counter() - t0
    cc.eval()
    ev, l0s = ExplainedVariance(S, D), []
    with torch.no_grad():
        for c in range(4):
            x = data.get(1_000_000 + c, 4096)
            o = cc(x)
            ev.update(x, o.recon)
            l0s.append(float((o.latents > 0).sum(-1).float().mean()))
    rec = feature_recovery(cc.W_dec, data.truth, scale=data.scale)
    result = dict(activation=activation, l1_coef=l1_coef, steps=steps, d_sae=d_sae, seconds=round(seconds, 1),
                  ev=round(float(ev.overall()), 4), l0=round(float(np.mean(l0s)), 2),
                  dead_fraction=round(1 - float(fired.float().mean()), 4),
                  recovered_frac=round(rec["recovered_frac"], 4))
    if thresholds:
        moved = (cc.log_threshold.detach() - t_start).abs()
        result.update(bandwidth=bandwidth, init_threshold=init_threshold, threshold_lr_factor=threshold_lr_factor,
                      threshold_grad_share=round(got_grad / max(n_obs, 1), 4),
                      threshold_grad_mean_abs=float(f"{grad_abs / max(n_obs, 1):.3g}"),
                      threshold_moved_median=round(float(moved.median()), 4),
                      threshold_median=float(f"{float(cc.log_threshold.detach().exp().median()):.4g}"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="two runs only")
    parser.add_argument("--grid", default="bandwidth",
                        help="bandwidth: bandwidths at one l1_coef; l1: l1_coefs at the default bandwidth; both")
    parser.add_argument("--bandwidths", type=float, nargs="*", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--l1", type=float, nargs="*", default=[1.0, 2.0])
    parser.add_argument("--relu-l1", type=float, nargs="*", default=[1.0, 2.0])
    parser.add_argument("--bandwidth", type=float, default=0.1, help="for --grid l1")
    parser.add_argument("--l1-coef", type=float, default=1.0, help="for --grid bandwidth")
    parser.add_argument("--init-threshold", type=float, default=0.1)
    parser.add_argument("--threshold-lr-factor", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: faster than 2 at this size on a shared machine)")
    parser.add_argument("--out", default=None, help="results file name under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Data(SyntheticConfig(), args.batch)  # python -m data.synthetic's defaults: S=4, D=64, 256 features
    runs = []
    jr = dict(init_threshold=args.init_threshold, threshold_lr_factor=args.threshold_lr_factor)
    if args.quick:
        plan = [("jumprelu", args.l1_coef, dict(bandwidth=args.bandwidth, **jr)), ("relu", args.relu_l1[0], {})]
    else:
        plan = []
        if args.grid in ("bandwidth", "both"):
            plan += [("jumprelu", args.l1_coef, dict(bandwidth=b, **jr)) for b in args.bandwidths]
        if args.grid in ("l1", "both"):
            plan += [("jumprelu", c, dict(bandwidth=args.bandwidth, **jr)) for c in args.l1]
        plan += [("relu", c, {}) for c in args.relu_l1]
    for activation, coef, kw in plan:
        r = train(data, activation, coef, args.steps, args.d_sae, **kw)
        runs.append(r)
        print(json.dumps(r), flush=True)
    out = ROOT / "bench" / "results" / (args.out or ("jumprelu_quick.json" if args.quick else f"jumprelu_{args.grid}.json"))
    out.write_text(json.dumps(dict(args=vars(args), runs=runs), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
