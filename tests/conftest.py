"""Shared fixtures: small datasets in the real shard format, and Hydra configs composed as train.py does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from data.format import DatasetWriter, Snapshot  # noqa: E402


def write_toy_dataset(folder: Path, *, n_samples: int = 40, tokens_per_sample: int = 32, n_snapshots: int = 3,
                      d_model: int = 16, n_features: int = 48, samples_per_shard: int = 10,
                      dtype: str = "float32", seed: int = 0, tag_tokens: bool = False,
                      split: dict | None = None) -> Path:
    """Sparse codes over random directions; snapshot s sees the same code with its direction set
    scaled by (s + 1), so a token's activations are aligned across snapshots in a checkable way:
    acts[:, s] == (s + 1) * acts[:, 0]. Token ids count up globally, so every token is identifiable.

    ``tag_tokens=True`` overwrites dimension 0 with a value that names the token and the snapshot:
    acts[t, s, 0] == token_id * n_snapshots + s (exact in float32; see ``token_tags``), so a batch row
    whose snapshots come from different tokens, or whose snapshot axis is permuted, shows. The (s + 1)
    relation then holds on dimensions 1: only. ``split`` is recorded in the manifest (DatasetWriter)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_features, d_model))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    snapshots = [Snapshot(f"step{2 ** s if s else 0}", 2 ** s if s else 0) for s in range(n_snapshots)]
    with DatasetWriter(folder, model="toy", hook_point="toy.resid", snapshots=snapshots, d_model=d_model,
                       tokens_per_sample=tokens_per_sample, dtype=dtype,
                       samples_per_shard=samples_per_shard, split=split) as writer:
        for i in range(n_samples):
            code = (rng.random((tokens_per_sample, n_features)) < 0.08) * rng.exponential(1.0, (tokens_per_sample, n_features))
            base = code @ dirs + 0.01 * rng.standard_normal((tokens_per_sample, d_model))
            acts = np.stack([(s + 1) * base for s in range(n_snapshots)], axis=1)
            tokens = np.arange(i * tokens_per_sample, (i + 1) * tokens_per_sample, dtype=np.int32)
            if tag_tokens:
                acts[:, :, 0] = tokens[:, None] * n_snapshots + np.arange(n_snapshots)[None, :]
            writer.write(acts.astype(np.float32), tokens, doc=i, start=0)
    return folder


def token_tags(batch, n_snapshots: int):
    """(token id, snapshot index) [B, S'] of each row and snapshot of a batch from a ``tag_tokens`` dataset."""
    import torch
    tag = torch.as_tensor(batch)[:, :, 0].double()
    assert torch.equal(tag, tag.round()), "tags are whole numbers: the row is not a tagged token"
    tag = tag.long()
    return tag // n_snapshots, tag % n_snapshots


def write_neox_suite(root: Path, n_revisions: int = 2) -> Path:
    """Revisions step0, step1, ... of a tiny random GPT-NeoX (3 layers, D=32), each the one before perturbed,
    saved as Hugging Face folders with a BPE tokenizer trained on a few files of the offline corpus."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.corpus import TextCorpus
    from data.tiny_suite import train_tokenizer
    corpus = TextCorpus("stdlib", max_docs=30, cache_dir=str(root / "hf"))
    tokenizer = train_tokenizer([t for _, t in corpus.texts()], vocab_size=400)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
                                             max_position_embeddings=256))
    for step in range(n_revisions):
        if step:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / f"step{step}")
        tokenizer.save_pretrained(root / f"step{step}")
    return root


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Path:
    return write_toy_dataset(tmp_path / "toy")


def compose_train(overrides: list[str], run_dir: Path):
    """The train config as Hydra composes it for train.py, with the run folder pinned to ``run_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        del cfg.hydra
    return cfg
