"""Schema of conf/analyze.yaml (a Hydra structured config, so a typo or wrong type fails with the key named)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class AttributionConfig:
    """attribution=<task> (conf/attribution/<task>.yaml); definitions in analysis/attribution.py."""
    task: Any = None  # the prompts and metric: _target_ analysis.tasks.Induction | IOI | SVA, and its parameters
    ig_steps: int = 16  # integrated-gradients steps between the corrupted and the clean hook output
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])  # sizes of the broken feature sets
    show_k: int = 50  # the k drawn over snapshots and judged by the causal check ("a few dozen", as the paper)
    random_sets: int = 5  # matched random feature sets per k (controls)
    match_candidates: int = 5  # a control for a top feature is drawn among the this many nearest in mean |delta f|
    selection_fraction: float = 0.5  # share of the prompt pairs that select the top features; the rest test them
    code: str = "joint"  # corrupted code: joint (from every snapshot's corrupted input) | local (snapshot s's only)
    n_top: int = 20  # top features per snapshot in top_features.csv and attribution.json
    min_gap: float = 0.1  # a snapshot has learned the task when clean - baseline metric >= this (nats)
    batch_size: int = 32  # prompts per forward pass
    snapshots: Optional[list[str]] = None  # snapshots to attribute at; null = every snapshot of the crosscoder
    repo: Optional[str] = None  # snapshot models; null = the dataset's record (local suite folder or hub id)
    layer: Optional[int] = None  # hook block; null = the dataset's record
    hook: Optional[str] = None  # resid_post | mlp_out | attn_out; null = the dataset's record
    seed: int = 0  # the prompt split and the random control sets


@dataclass
class AnalyzeConfig:
    run: Optional[str] = None  # a run folder written by train.py
    sweep: Optional[str] = None  # a multirun folder: <sweep>/<job>/ run folders
    out: Optional[str] = None  # output folder; null = <run>/analysis or <sweep>/analysis
    emergence_fraction: float = 0.2  # a feature exists at s when ||W_dec[i,s]|| >= this x its maximum
    active_threshold: float = 0.01  # feature active at s when f_i ||W_dec[i,s]|| > this x sqrt(D)
    max_tokens: Optional[int] = 262_144  # tokens read by the activation pass (held-out shards first); null = all
    batch_size: int = 2048  # tokens per forward pass
    device: str = "cpu"
    n_browser_features: int = 24  # features shown in the browser
    n_contexts: int = 6  # top contexts shown per feature and view
    browser_snapshots: int = 4  # snapshots (evenly spaced) whose own encoder term is ranked in the browser
    context_before: int = 12  # tokens shown before the highlighted token
    context_after: int = 4  # tokens shown after it
    baselines: Optional[Any] = None  # single-snapshot SAE runs for figure 4: a sweep folder or list of run folders
    tensorboard: bool = True  # also log the figures as TensorBoard images under <out>/tensorboard
    seed: int = 0  # random choice of browser features per category
    paths: Any = None  # conf/paths: root, cache and output folders, as train.py has them
    attribution: Optional[AttributionConfig] = None  # attribution=<task>: the task's attribution over snapshots


def check(cfg: Any) -> None:
    """One-line ValueError naming the first key with an impossible value."""
    if (cfg.run is None) == (cfg.sweep is None):
        raise ValueError("analyze.py: give exactly one of run=<run folder> or sweep=<multirun folder>")
    rules = [("emergence_fraction", 0 < cfg.emergence_fraction <= 1, "in (0, 1]"),
             ("active_threshold", cfg.active_threshold >= 0, ">= 0"),
             ("max_tokens", cfg.max_tokens is None or cfg.max_tokens > 0, "> 0 or null"),
             ("batch_size", cfg.batch_size > 0, "> 0"),
             ("n_browser_features", cfg.n_browser_features >= 0, ">= 0"),
             ("n_contexts", cfg.n_contexts > 0, "> 0"),
             ("browser_snapshots", cfg.browser_snapshots >= 0, ">= 0"),
             ("context_before", cfg.context_before >= 0, ">= 0"),
             ("context_after", cfg.context_after >= 0, ">= 0")]
    a = cfg.attribution
    if a is not None:
        if a.task is None or "_target_" not in a.task:
            raise ValueError("conf/analyze.yaml: attribution.task needs a _target_ (choose attribution=induction|ioi|sva)")
        rules += [("attribution.ig_steps", a.ig_steps > 0, "> 0"),
                  ("attribution.ks", len(a.ks) > 0 and all(k > 0 for k in a.ks), "a non-empty list of k > 0"),
                  ("attribution.show_k", a.show_k in a.ks, f"one of attribution.ks {list(a.ks)}"),
                  ("attribution.random_sets", a.random_sets > 0, "> 0"),
                  ("attribution.match_candidates", a.match_candidates > 0, "> 0"),
                  ("attribution.selection_fraction", 0 < a.selection_fraction < 1, "in (0, 1)"),
                  ("attribution.code", a.code in ("joint", "local"), "joint or local"),
                  ("attribution.n_top", a.n_top > 0, "> 0"),
                  ("attribution.batch_size", a.batch_size > 0, "> 0")]
    for key, ok, want in rules:
        if not ok:
            raise ValueError(f"conf/analyze.yaml: {key}={OmegaConf.select(cfg, key)} must be {want}")


def register() -> None:
    ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)
