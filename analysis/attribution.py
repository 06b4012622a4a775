"""Attribution of a task's metric to crosscoder features at every snapshot, with a causal check (the paper's
attribution analysis; definitions in docs/ANALYSIS.md, "Attribution across snapshots").

Axes: N prompts, T positions (from drop_first on), S snapshots, D model width, F latents.

At snapshot s, with the crosscoder spliced in (analysis.splice), clean and corrupted prompts (analysis.tasks),
their hook outputs h_clean / h_corr [N, T, D] and codes f_clean / f_corr [N, T, F], and m(h) = the mean over
prompts of the task's logit difference when the clean prompts run with the hook's output set to h:

  integrated gradients  A_i = sum_{n,t} (f_clean - f_corr)[n,t,i] * mean_alpha dm/df_i (h(alpha)),
                        h(alpha) = h_corr + alpha (h_clean - h_corr), alpha at the midpoints of ig_steps
                        equal steps. decode_s is affine and the error term moves with the code, so h(alpha) is
                        exactly the spliced output of the interpolated code and error, and
                        sum_i A_i + A_error = m(h_clean) - m(h_corr) up to the quadrature error (reported).
  attribution patching  the same with the gradient at the clean run only (alpha = 1), one backward pass
                        (Nanda 2023; Syed et al. 2023).

A_i > 0 says that patching feature i to its corrupted value lowers the metric by about A_i: the feature
carries that much of the clean behaviour. Features are ranked by A_i from integrated gradients.

The corrupted code (``code``): "joint" (the default, the crosscoder's own code of the corrupted prompt, from every
snapshot's activation: at an early snapshot it also carries what later checkpoints do with the corruption) or
"local" (the encoder reads snapshot s's corrupted activation and every other snapshot's clean one, so the code
changes only as snapshot s's own model does; results go to <task>_local). The clean code is the same in both.

Select, then test, on different prompts: the prompt pairs are split once (``selection_fraction``, seeded; pairs
that share a prompt stay together) into a selection half, on which the attributions are computed and the top-k
features chosen, and a test half, on which the causal check breaks and restores them.

Causal check at each snapshot and each k, on the test half:
  break    the top-k features patched to their corrupted values in the clean run: the metric must move toward
           the corrupted baseline m(h_corr);
  random   matched controls: k other features matched to the top k in size of effect on the code, i.e. mean
           |f_clean - f_corr| over the positions that matter (from drop_first to the answer position; not the
           padding after it) on the selection half: one drawn among the ``match_candidates`` features nearest to
           each top feature (see matched_controls), so the set's mean size is the top set's where the pool
           allows it (the achieved sizes are reported). Patched the same way, they must not move the metric as
           much (mean and standard deviation over ``random_sets`` draws);
  restore  the corrupted run with only the top-k features set to their clean values.

Shares (a feature's or the error term's attribution over the clean-baseline gap, the gap closed by a broken
set) are reported only where that half's gap is at least ``min_gap``: below it they are ratios of noise.
What is written from the results (attribution.json, the CSV and NPZ, TensorBoard): analysis/attribution_summary.py.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from analysis.run_files import RunFiles, select
from analysis.splice import decode_at, hook_activations, logits_with, snapshot_code
from analysis.tasks import TaskPrompts, answer_mask, logit_diff, split_prompts, take
from data.snapshots import check_revisions, load_snapshot, load_tokenizer


class Site(NamedTuple):
    repo: str  # hub id or local folder with one sub-folder per revision
    layer: int
    hook: str
    drop_first: int  # positions at the start of every window that the crosscoder never saw


def model_site(run: RunFiles, repo: str | None = None, layer: int | None = None, hook: str | None = None) -> Site:
    """Where the snapshot models are and which hook the crosscoder reads: the dataset manifest's record,
    else the run's config, each overridable."""
    extra = run.manifest.extra if run.manifest is not None else {}
    repo = repo or extra.get("repo") or select(run.config, "model.repo")
    if not repo:
        raise ValueError(f"{run.run_dir}: no snapshot models recorded (dataset manifest extra.repo or config "
                         "model.repo); set attribution.repo=<local suite folder or hub id>")
    layer = layer if layer is not None else extra.get("layer", select(run.config, "model.layer"))
    hook = hook or extra.get("hook") or select(run.config, "model.hook", "resid_post")
    if layer is None:
        raise ValueError(f"{run.run_dir}: the hook's layer is not recorded; set attribution.layer=<block index>")
    live = select(run.config, "data.drop_first")  # a live run's own setting; a cached run's is the manifest's
    drop_first = int(extra.get("drop_first", live if live is not None else select(run.config, "cache.drop_first", 0)))
    return Site(str(repo), int(layer), str(hook), drop_first)


@dataclasses.dataclass
class SnapshotAttribution:
    name: str
    step: int
    # selection half: attribution
    select_clean: float  # m of the clean prompts
    select_baseline: float  # m(h_corr)
    ig: np.ndarray  # [F] integrated-gradients attribution
    atp: np.ndarray  # [F] attribution patching
    error_ig: float  # integrated-gradients attribution of the error term
    size: np.ndarray  # [F] mean |f_clean - f_corr| over the positions that matter
    # test half: causal check
    metric_clean: float  # the model's own forward pass on the clean prompts
    metric_corrupted: float  # ... on the corrupted prompts
    metric_baseline: float  # m(h_corr): clean prompts with the corrupted hook output (= corrupted for resid_post)
    ks: list[int]  # set sizes actually used (capped at the features the corruption changes)
    break_top: list[float]  # m after breaking the top-k, per k
    break_random: list[list[float]]  # m after breaking each matched control set, per k and draw ([] : none)
    restore_top: list[float]  # m of the corrupted run with the top-k restored, per k
    size_top: list[float]  # mean size (test half) of the top-k features, per k
    size_random: list[list[float]]  # ... of each control set, per k and draw

    @property
    def changed(self) -> np.ndarray:
        """[F] bool: features the corruption changes at a position that matters (selection half)."""
        return self.size > 0


def _metric(model, prompts: TaskPrompts, site: Site, value: torch.Tensor | None, batch_size: int,
            ids: torch.Tensor | None = None) -> float:
    ids = prompts.clean if ids is None else ids
    total = 0.0
    for i in range(0, len(ids), batch_size):
        rows = slice(i, i + batch_size)
        v = None if value is None else value[rows]
        total += logit_diff(logits_with(model, ids[rows], site.layer, site.hook, site.drop_first, v),
                            prompts, rows).sum().item()
    return total / len(ids)


def mean_gradient(model, prompts: TaskPrompts, site: Site, h_clean: torch.Tensor, h_corr: torch.Tensor,
                  alphas: list[float], batch_size: int) -> torch.Tensor:
    """[N, T, D]: the mean over alphas of dm/dh at h_corr + alpha (h_clean - h_corr), m the mean logit
    difference over all N prompts (so each prompt's gradient carries its 1/N)."""
    N = len(prompts.clean)
    grad = torch.zeros_like(h_clean)
    for i in range(0, N, batch_size):
        rows = slice(i, i + batch_size)
        for alpha in alphas:
            h = (h_corr[rows] + alpha * (h_clean[rows] - h_corr[rows])).requires_grad_(True)
            m = logit_diff(logits_with(model, prompts.clean[rows], site.layer, site.hook, site.drop_first, h),
                           prompts, rows).sum() / N
            grad[rows] += torch.autograd.grad(m, h)[0] / len(alphas)
    return grad


@torch.no_grad()
def feature_attribution(crosscoder, s: int, delta_code: torch.Tensor, grad: torch.Tensor,
                        batch_size: int) -> np.ndarray:
    """[F] sum_{n,t} delta_code[n,t,i] * dm/df_i, with dm/df_i = grad . W_dec[i, s] / scale[s]."""
    W = crosscoder.W_dec[:, s] / crosscoder.scale[s]  # [F, D]
    out = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    for i in range(0, len(grad), batch_size):
        out += (delta_code[i:i + batch_size] * (grad[i:i + batch_size] @ W.T)).sum((0, 1)).double()
    return out.cpu().numpy()


@torch.no_grad()
def change_size(delta_code: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """[F] mean |delta_code| [N, T, F] over the positions where mask [N, T] is True."""
    m = mask.to(delta_code.device)
    return (delta_code.abs() * m[..., None]).sum((0, 1)).double().div(max(int(m.sum()), 1)).cpu().numpy()


def matched_controls(size: np.ndarray, top: np.ndarray, pool: np.ndarray, draws: int, rng: np.random.Generator,
                     candidates: int = 5) -> list[np.ndarray]:
    """``draws`` control sets for the features ``top``, each as large, disjoint from it and matched to it in total
    size: for every top feature, largest first, one feature is drawn at random among the ``candidates`` still
    unused ones of ``pool`` nearest to a target, that feature's size plus what the set drawn so far falls short
    of the top features taken so far (so one top feature without a peer of its size is made up by the next ones).
    [] when the pool (less the top features) is smaller than the top set."""
    pool = np.setdiff1d(pool, top)
    if len(pool) < len(top) or len(top) == 0:
        return []
    sizes = size[pool].astype(np.float64)
    sets = []
    for _ in range(draws):
        free = np.ones(len(pool), dtype=bool)
        chosen, deficit = [], 0.0
        for f in sorted(top, key=lambda f: -size[f]):
            idx = np.flatnonzero(free)
            target = size[f] + deficit
            near = idx[np.argsort(np.abs(sizes[idx] - target), kind="stable")[:candidates]]
            pick = int(rng.choice(near))
            free[pick] = False
            chosen.append(pool[pick])
            deficit = target - sizes[pick]
        sets.append(np.array(chosen, dtype=np.int64))
    return sets


@torch.no_grad()
def causal_check(model, crosscoder, s: int, prompts: TaskPrompts, site: Site, h_clean: torch.Tensor,
                 h_corr: torch.Tensor, delta_code: torch.Tensor, tops: list[np.ndarray],
                 controls: list[list[np.ndarray]], batch_size: int):
    """Metrics after breaking each top set / each of its control sets and restoring each top set (see the
    module docstring): (break_top [per set], break_random [per set, per control], restore_top [per set])."""
    def shift(features: np.ndarray) -> torch.Tensor:  # hook-output change of patching these features' codes
        idx = torch.as_tensor(np.ascontiguousarray(features), device=delta_code.device)
        return delta_code[..., idx] @ (crosscoder.W_dec[idx, s] / crosscoder.scale[s])

    top, rand, restore = [], [], []
    for features, sets in zip(tops, controls):
        top.append(_metric(model, prompts, site, h_clean - shift(features), batch_size))
        rand.append([_metric(model, prompts, site, h_clean - shift(c), batch_size) for c in sets])
        restore.append(_metric(model, prompts, site, h_corr + shift(features), batch_size))
    return top, rand, restore


def attribute_snapshot(model, crosscoder, s: int, name: str, step: int, prompts: TaskPrompts, site: Site,
                       h_clean: torch.Tensor, h_corr: torch.Tensor, code_clean: torch.Tensor, code_corr: torch.Tensor,
                       split: tuple[np.ndarray, np.ndarray], ig_steps: int, ks: list[int], random_sets: int,
                       batch_size: int, rng: np.random.Generator, match_candidates: int = 5) -> SnapshotAttribution:
    """Attribution on the selection half and the causal check on the test half at snapshot s. h_* [N, T, D]
    raw hook outputs, code_* [N, T, F] its codes, split = (selection, test) prompt indices."""
    model.requires_grad_(False)  # gradients are needed w.r.t. the hook output only
    mask = answer_mask(prompts, h_clean.shape[1], site.drop_first)
    sel, test = (torch.as_tensor(i, dtype=torch.long) for i in split)
    p_sel, p_test = take(prompts, sel), take(prompts, test)

    hc, hr, delta = h_clean[sel], h_corr[sel], code_clean[sel] - code_corr[sel]
    alphas = [(j + 0.5) / ig_steps for j in range(ig_steps)]
    grad_ig = mean_gradient(model, p_sel, site, hc, hr, alphas, batch_size)
    grad_atp = mean_gradient(model, p_sel, site, hc, hr, [1.0], batch_size)
    ig = feature_attribution(crosscoder, s, delta, grad_ig, batch_size)
    atp = feature_attribution(crosscoder, s, delta, grad_atp, batch_size)
    with torch.no_grad():
        delta_error = (hc - decode_at(crosscoder, code_clean[sel], s)) - (hr - decode_at(crosscoder, code_corr[sel], s))
        error_ig = float((delta_error * grad_ig).sum())
    size = change_size(delta, mask[sel])
    del grad_ig, grad_atp, delta_error
    order = np.argsort(-ig, kind="stable")
    pool = np.flatnonzero(size > 0)
    used = sorted({min(k, len(pool)) for k in ks} - {0})
    tops = [order[:k] for k in used]
    controls = [matched_controls(size, t, pool, random_sets, rng, match_candidates) for t in tops]

    hc, hr, delta = h_clean[test], h_corr[test], code_clean[test] - code_corr[test]
    top, rand, restore = causal_check(model, crosscoder, s, p_test, site, hc, hr, delta, tops, controls, batch_size)
    size_test = change_size(delta, mask[test])
    return SnapshotAttribution(
        name=name, step=step,
        select_clean=_metric(model, p_sel, site, None, batch_size),
        select_baseline=_metric(model, p_sel, site, h_corr[sel], batch_size),
        ig=ig, atp=atp, error_ig=error_ig, size=size,
        metric_clean=_metric(model, p_test, site, None, batch_size),
        metric_corrupted=_metric(model, p_test, site, None, batch_size, ids=p_test.corrupted),
        metric_baseline=_metric(model, p_test, site, hr, batch_size),
        ks=used, break_top=top, break_random=rand, restore_top=restore,
        size_top=[float(size_test[t].mean()) for t in tops],
        size_random=[[float(size_test[c].mean()) for c in sets] for sets in controls])


def local_corrupted(clean: torch.Tensor, corr: torch.Tensor, s: int) -> torch.Tensor:
    """[N, T, S, D]: the clean activations of every snapshot but s, which has its corrupted ones: the encoder
    input of the snapshot-local code (``attribution.code=local``)."""
    out = clean.clone()
    out[:, :, s] = corr[:, :, s]
    return out


def run(run_files: RunFiles, cfg: Any, device: str = "cpu") -> tuple[Any, TaskPrompts, Site, list[SnapshotAttribution],
                                                                  tuple[np.ndarray, np.ndarray]]:
    """The task's prompts through every snapshot: activations first (the encoder reads all snapshots), then
    attribution (selection half) and the causal check (test half) at each analysed snapshot. cfg: the
    ``attribution`` config node. Returns the task, prompts, site, results and the (selection, test) split."""
    from hydra.utils import instantiate
    task = instantiate(cfg.task)
    site = model_site(run_files, cfg.repo, cfg.layer, cfg.hook)
    names, steps = run_files.names, run_files.steps
    analysed = list(cfg.snapshots) if cfg.snapshots else names
    unknown = [n for n in analysed if n not in names]
    if unknown:
        raise ValueError(f"attribution.snapshots: {unknown} are not snapshots of the crosscoder {names}")
    check_revisions(site.repo, names)
    prompts = task.prompts(load_tokenizer(site.repo, names[-1]))
    if prompts.clean.shape[1] <= site.drop_first:
        raise ValueError(f"attribution: prompts of {prompts.clean.shape[1]} tokens leave nothing after the "
                         f"{site.drop_first} dropped start position(s)")
    crosscoder = run_files.crosscoder.to(device).eval().requires_grad_(False)
    B = cfg.batch_size
    acts_clean, acts_corr = [], []
    for name in tqdm(names, desc=f"{task.name}: activations", unit="snapshot", dynamic_ncols=True):
        model = load_snapshot(site.repo, name, device=device)
        acts_clean.append(hook_activations(model, prompts.clean, site.layer, site.hook, B)[:, site.drop_first:])
        acts_corr.append(hook_activations(model, prompts.corrupted, site.layer, site.hook, B)[:, site.drop_first:])
        del model
        gc.collect()
    D = crosscoder.d_model
    if acts_clean[0].shape[-1] != D:
        raise ValueError(f"{site.repo}: the hook output has width {acts_clean[0].shape[-1]}, the crosscoder {D}")
    clean = torch.stack(acts_clean, dim=2).to(device)  # [N, T, S, D]
    corr = torch.stack(acts_corr, dim=2).to(device)
    del acts_clean, acts_corr
    local = cfg.code == "local"
    shared = crosscoder.activation != "paper"  # one code for every snapshot: compute it once
    codes = (snapshot_code(crosscoder, clean, 0), None if local else snapshot_code(crosscoder, corr, 0)) \
        if shared else None
    split = split_prompts(prompts, cfg.selection_fraction, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    results = []
    for name in tqdm(analysed, desc=f"{task.name}: attribution", unit="snapshot", dynamic_ncols=True):
        s = names.index(name)
        model = load_snapshot(site.repo, name, device=device)
        code_clean = codes[0] if shared else snapshot_code(crosscoder, clean, s)
        if local:  # the corruption as snapshot s alone sees it: the other snapshots' inputs stay clean
            code_corr = snapshot_code(crosscoder, local_corrupted(clean, corr, s), s)
        else:
            code_corr = codes[1] if shared else snapshot_code(crosscoder, corr, s)
        results.append(attribute_snapshot(model, crosscoder, s, name, steps[s], prompts, site, clean[:, :, s],
                                          corr[:, :, s], code_clean, code_corr, split, cfg.ig_steps, list(cfg.ks),
                                          cfg.random_sets, B, rng, cfg.match_candidates))
        del model
        gc.collect()
    return task, prompts, site, results, split
