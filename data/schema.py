"""Typed schemas of the two config groups that name no ``_target_`` (their values are read by the cache and the
live datamodule, not passed to one constructor): ``model`` (a snapshot suite) and ``cache`` (how activations are
cached). ``cli.check_config`` checks the composed config against them at start-up, as it checks every
``_target_`` node against its constructor, so a wrong type or a missing key is named before any work.
Each field's meaning is commented in conf/model/*.yaml and conf/cache/default.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelConfig:
    name: str  # short name used in cache keys and run names
    repo: Optional[str]  # hub id, or a local folder with one sub-folder per revision; null = what `build` returns
    revisions: list[str]  # the snapshots, e.g. [step0, step1000, ...]
    layer: int  # hook block index
    hook: str  # resid_post | mlp_out | attn_out
    d_model: int
    context_length: int  # tokens per window fed to the model
    build: Any = None  # a _target_ that builds a local suite when it is absent (the offline mini-Pythia)
    paper_revisions: Optional[list[str]] = None  # Pythia: the paper's exact 32 revisions


@dataclass
class CacheConfig:
    n_tokens: int
    dtype: str  # float16 | bfloat16 | float32 on disk
    drop_first: int
    samples_per_shard: int
    val_shards: int
    heldout_every: int
    chunk_tokens: int
    batch_size: int
    model_dtype: str
    device: str


SCHEMAS = {"model": ModelConfig, "cache": CacheConfig}
