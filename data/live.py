"""Live activations: the snapshot models run on corpus windows as training goes; nothing touches disk.

    python train.py data=live                              # the mini-Pythia suite, no activation cache
    python train.py experiment=paper_pythia160m            # 32 Pythia-160M snapshots on one GPU

Caching costs S x D x 2 bytes per token (39 TB for the paper's Pythia-160M study); running the snapshot
models, truncated after the hooked layer, costs less compute than the crosscoder step they feed. The batch
contract is the cached path's (``data/datamodule.py``): raw float32 activations ``[B, S, D]``, with the
per-snapshot normalisation reported to the crosscoder (``norm_scale``, ``raw_mean``) and stored with its
weights.

The stream, per DDP rank:

    corpus windows of the training documents (window j goes to rank j % world_size), repeated forever
      -> the rank's token stream (drop_first positions of each window left out, as in the cache)
      -> blocks of ``block_tokens`` consecutive tokens (a multiple of the batch size): the windows covering a
         block run through the S snapshot models into one buffer [block_tokens, S, D]
      -> the block's tokens permuted (seeded by seed, rank and block number), cut into batches

A block is a function of its number alone, so a checkpoint needs only the count of batches consumed: a resumed
run recomputes the block it stopped in (at most ``block_tokens`` tokens of forwards) and skips the batches it
already trained on, and its stream equals the uninterrupted one. Validation reads windows of held-out documents
(every ``heldout_every``-th document is never trained on), the same windows at every validation.
"""

from __future__ import annotations

import logging
import math
import os
from itertools import islice
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from data.cache import resolve_repo
from data.corpus import heldout_documents
from data.format import FormatError
from data.snapshots import activations, check_revisions, hook_module, load_snapshot, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(key: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}: '{name}' is not one of {tuple(DTYPES)}")
    return DTYPES[name]


def truncate_after(model, layer: int) -> None:
    """Drop the blocks above ``layer`` and the unembedding: the hook stops the forward there, so they would
    only hold memory (Pythia-160M's unembedding alone is 39M of its 162M parameters)."""
    body = model.gpt_neox if hasattr(model, "gpt_neox") else model.model
    body.layers = body.layers[:layer + 1]
    for head in ("embed_out", "lm_head"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class SnapshotModels:
    """The S snapshot models, truncated after the hook, and their activations on token windows.

    ``placement="resident"`` keeps every model on ``device``; ``"rotate"`` keeps them in host memory and
    moves each to ``device`` in turn for a whole block (for suites whose S models do not fit beside the
    crosscoder); ``"auto"`` is resident when the models take at most a quarter of the device's memory.
    """

    def __init__(self, repo: str, revisions: list[str], layer: int, hook: str, d_model: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", placement: str = "auto",
                 forward_batch: int = 64):
        if placement not in ("auto", "resident", "rotate"):
            raise ValueError(f"data.placement: '{placement}' is not one of ('auto', 'resident', 'rotate')")
        self.repo, self.revisions, self.layer, self.hook, self.d_model = repo, revisions, layer, hook, d_model
        self.device, self.forward_batch = torch.device(device), forward_batch
        self.models = []
        for revision in tqdm(revisions, desc="loading snapshot models", unit="model", dynamic_ncols=True):
            model = load_snapshot(repo, revision, dtype, "cpu")
            width = model.config.hidden_size
            if width != d_model:
                raise FormatError(f"{repo}/{revision}: hidden size {width}, but model.d_model is {d_model} "
                                  "(every snapshot of one crosscoder must have the same width)")
            hook_module(model, layer, hook)  # checks layer and hook before any work
            truncate_after(model, layer)
            for p in model.parameters():
                p.requires_grad_(False)
            self.models.append(model)
        self.bytes = sum(model_bytes(m) for m in self.models)
        if placement == "auto":
            placement = "resident"
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                placement = "resident" if self.bytes <= total / 4 else "rotate"
        self.placement = placement
        if placement == "resident":
            for m in self.models:
                m.to(self.device)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, drop_first: int, out_dtype: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """[W, T - drop_first, S, D] activations (``out_dtype``, on the device) of windows ``ids`` [W, T],
        written into ``out`` when given."""
        W, T = ids.shape
        if out is None:
            out = torch.empty((W, T - drop_first, len(self.models), self.d_model), dtype=out_dtype, device=self.device)
        ids = ids.to(self.device)
        for s, model in enumerate(self.models):
            if self.placement == "rotate":
                model.to(self.device)
            for i in range(0, W, self.forward_batch):
                acts = activations(model, ids[i:i + self.forward_batch], self.layer, self.hook)[:, drop_first:]
                if not torch.isfinite(acts).all():
                    raise FormatError(f"{self.repo}/{self.revisions[s]}: NaN/Inf activations at the hook "
                                      f"(layer {self.layer}, {self.hook})")
                out[i:i + len(acts), :, s] = acts.to(out_dtype)
            if self.placement == "rotate":
                model.to("cpu")
        return out


class _Batches(IterableDataset):
    """Hands a generator function to the DataLoader (which runs it in this process: the models live here)."""

    def __init__(self, make: Callable[[], Iterator[torch.Tensor]]):
        self.make = make

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.make()


def _rank_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LiveActivationDataModule(L.LightningDataModule):
    """Activations of a model suite computed on the fly from corpus windows (see the module docstring)."""

    def __init__(self, model: DictConfig, corpus, cache_dir: str, snapshots: list[str] | None = None,
                 batch_size: int = 1024, block_tokens: int = 262_144, heldout_every: int = 20,
                 val_tokens: int = 131_072, keep_val_bytes: int = 2 << 30, norm_tokens: int = 65_536,
                 drop_first: int = 1, forward_batch: int = 64, model_dtype: str = "float32",
                 buffer_dtype: str = "float32", device: str = "auto", placement: str = "auto", seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: {batch_size} must be >= 1")
        if not 0 <= drop_first < model.context_length:
            raise ValueError(f"data.drop_first: {drop_first} must be in 0..{model.context_length - 1}")
        self.model_cfg, self.cache_dir = model, cache_dir
        self.corpus = instantiate(corpus) if isinstance(corpus, (dict, DictConfig)) else corpus
        self.snapshot_selection = list(snapshots) if snapshots is not None else None
        self.batch_size = batch_size
        # a whole number of batches per block, so a block's batches are all full and a block is its number's alone
        self.block_tokens = max(1, round(block_tokens / batch_size)) * batch_size
        self.train_docs = heldout_documents(heldout_every, held_out=False)
        self.val_docs = heldout_documents(heldout_every, held_out=True)
        self.heldout_every, self.val_tokens, self.keep_val_bytes = heldout_every, val_tokens, keep_val_bytes
        self.norm_tokens, self.drop_first, self.forward_batch = norm_tokens, drop_first, forward_batch
        self.model_dtype, self.buffer_dtype = _dtype("data.model_dtype", model_dtype), _dtype("data.buffer_dtype", buffer_dtype)
        self.device_setting, self.placement, self.seed = device, placement, seed
        self.T = model.context_length - drop_first  # tokens per window that enter the stream
        self.resume_batches = 0
        self.models: SnapshotModels | None = None
        self._val: torch.Tensor | None = None
        self.stats_tokens = 0

    # ---- what the model needs to know about the data -------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.models is not None:
            return
        revisions = list(self.model_cfg.revisions)
        if self.snapshot_selection is not None:
            unknown = [s for s in self.snapshot_selection if s not in revisions]
            if unknown:
                raise ValueError(f"data.snapshots: {unknown} are not in model.revisions {revisions}")
            revisions = self.snapshot_selection
        self.repo = resolve_repo(self.model_cfg, self.cache_dir)
        check_revisions(self.repo, revisions)
        self.revisions = revisions
        self.tokenizer = load_tokenizer(self.repo, revisions[0])
        device = self.device_setting
        if device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.models = SnapshotModels(self.repo, revisions, self.model_cfg.layer, self.model_cfg.hook,
                                     self.model_cfg.d_model, self.model_dtype, device, self.placement,
                                     self.forward_batch)
        self._estimate_statistics()

    @property
    def snapshot_names(self) -> list[str]:
        return list(self.revisions)

    @property
    def n_snapshots(self) -> int:
        return len(self.revisions)

    @property
    def d_model(self) -> int:
        return int(self.model_cfg.d_model)

    def windows(self, documents: Callable[[int], bool]) -> Iterator[np.ndarray]:
        """Token windows [context_length] of the chosen documents, in the corpus's order (one pass)."""
        for w in self.corpus.windows(self.tokenizer, self.model_cfg.context_length, documents=documents):
            yield w.tokens

    def _estimate_statistics(self) -> None:
        """Mean norm and mean vector per snapshot over the first ``norm_tokens`` training tokens, in float64.

        Every rank reads the same windows (the start of the training documents, before the split into ranks),
        so every rank gets the same scale without communicating. Training data only: no held-out document."""
        S, D = self.n_snapshots, self.d_model
        norm_sum, vec_sum, count = torch.zeros(S, dtype=torch.float64), torch.zeros(S, D, dtype=torch.float64), 0
        n_windows = max(1, math.ceil(self.norm_tokens / self.T))
        windows = list(islice(self.windows(self.train_docs), n_windows))
        if not windows:
            raise FormatError(f"corpus {self.corpus.config()}: no training windows of {self.model_cfg.context_length} tokens")
        step = max(1, self.forward_batch)
        for i in tqdm(range(0, len(windows), step), desc="activation statistics", unit="batch", dynamic_ncols=True):
            acts = self.models.run(torch.from_numpy(np.stack(windows[i:i + step])).long(), self.drop_first,
                                   self.buffer_dtype).flatten(0, 1).double().cpu()
            norm_sum += acts.norm(dim=-1).sum(0)
            vec_sum += acts.sum(0)
            count += acts.shape[0]
        self.mean_norm, self.mean, self.stats_tokens = norm_sum / count, vec_sum / count, count

    def norm_scale(self) -> torch.Tensor:
        """[S]: factor that brings each snapshot's mean activation norm to sqrt(D) (as in the paper)."""
        return (math.sqrt(self.d_model) / self.mean_norm).float()

    def raw_mean(self) -> torch.Tensor:
        """[S, D]: mean raw activation per snapshot."""
        return self.mean.float()

    # ---- position in the stream, saved in Lightning checkpoints ------------------------------------
    def state_dict(self) -> dict:
        # Every rank has consumed the same number of batches, and a rank's stream is a function of that
        # number, so rank 0's checkpoint restores every rank.
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed if self.trainer is not None else 0
        return {"batches": int(consumed), "seed": self.seed, "batch_size": self.batch_size,
                "block_tokens": self.block_tokens, "heldout_every": self.heldout_every}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "batch_size": self.batch_size, "block_tokens": self.block_tokens,
                "heldout_every": self.heldout_every}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"resuming with data {mine}, but the checkpoint's stream was {theirs}")
        self.resume_batches = int(state["batches"])

    # ---- the training stream --------------------------------------------------------------------------
    def rank_windows(self, rank: int, world: int, skip: int) -> Iterator[np.ndarray]:
        """This rank's training windows (corpus window j belongs to rank j % world), epoch after epoch,
        after the first ``skip`` of them."""
        seen = 0
        while True:
            n_this_epoch = 0
            for j, tokens in enumerate(self.windows(self.train_docs)):
                if j % world != rank:
                    continue
                n_this_epoch += 1
                if seen >= skip:
                    yield tokens
                seen += 1
            if n_this_epoch == 0:
                raise FormatError(f"corpus {self.corpus.config()}: no training window for rank {rank} of {world}")

    def block(self, k: int, windows: Iterator[np.ndarray], first_window: int,
              carried: tuple[int, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[int, torch.Tensor]]:
        """Block k: tokens [k M, (k + 1) M) of the rank's token stream, as [M, S, D] in buffer dtype.

        ``windows`` yields the rank's windows from index ``first_window`` on; ``carried`` is (index, acts) of
        the window the previous block ended in, reused when this block starts in it."""
        M, T = self.block_tokens, self.T
        g0, g1 = k * M // T, ((k + 1) * M - 1) // T  # windows covering the block, inclusive
        offset = k * M - g0 * T
        # one buffer for the block, written in place: no second copy of it at any time
        acts = torch.empty((g1 - g0 + 1, T, self.n_snapshots, self.d_model), dtype=self.buffer_dtype,
                           device=self.models.device)
        first = 0
        if carried is not None and carried[0] == g0:
            acts[0] = carried[1][0]
            first, g0 = 1, g0 + 1
        if g1 >= g0:
            assert first_window == g0, (first_window, g0)
            ids = torch.from_numpy(np.stack(list(islice(windows, g1 - g0 + 1)))).long()
            self.models.run(ids, self.drop_first, self.buffer_dtype, out=acts[first:])
        last = (g1, acts[-1:].clone())  # a copy: a view would keep the whole block alive
        return acts.flatten(0, 1)[offset:offset + M], last

    def train_batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        rank, world = _rank_info()
        per_block = self.block_tokens // self.batch_size
        k, skip = divmod(start_batch, per_block)
        first_window = k * self.block_tokens // self.T
        windows = self.rank_windows(rank, world, first_window)
        carried = None
        shuffle = self.block_tokens > self.batch_size
        while True:
            tokens, carried = self.block(k, windows, first_window, carried)
            first_window = carried[0] + 1
            if shuffle:  # seeded by the block's number: a resumed run draws the same permutation
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, rank, k)).generate_state(1)[0]))
                order = torch.randperm(len(tokens), generator=gen).to(tokens.device)
            for b in range(skip, per_block):
                idx = slice(b * self.batch_size, (b + 1) * self.batch_size)
                # a gather or a copy, never a view: a batch held by the loop must not keep the block alive
                yield tokens[order[idx]].float() if shuffle else tokens[idx].to(torch.float32, copy=True)
            del tokens  # before the next block is built: one block in memory at a time
            skip, k = 0, k + 1

    # ---- validation ---------------------------------------------------------------------------------
    def val_batches(self) -> Iterator[torch.Tensor]:
        """The first ``val_tokens`` tokens of the held-out documents (this rank's share), in order; kept in
        memory after the first validation when they fit in ``keep_val_bytes``."""
        if self._val is not None:
            yield from self._val.float().split(self.batch_size)
            return
        rank, world = _rank_info()
        n_windows = max(1, math.ceil(self.val_tokens / self.T))
        mine = [w for j, w in enumerate(islice(self.windows(self.val_docs), n_windows)) if j % world == rank]
        if not mine:
            raise FormatError(f"corpus {self.corpus.config()}: no held-out window for validation "
                              f"(data.heldout_every={self.heldout_every} holds out too few documents)")
        step = max(1, self.forward_batch)
        kept, pending = [], None
        keep = len(mine) * self.T * self.n_snapshots * self.d_model * self.buffer_dtype.itemsize <= self.keep_val_bytes
        for i in range(0, len(mine), step):
            acts = self.models.run(torch.from_numpy(np.stack(mine[i:i + step])).long(), self.drop_first,
                                   self.buffer_dtype).flatten(0, 1)
            if keep:
                kept.append(acts)
            pending = acts if pending is None else torch.cat([pending, acts])
            while len(pending) >= self.batch_size:
                yield pending[:self.batch_size].float()
                pending = pending[self.batch_size:]
        if pending is not None and len(pending):
            yield pending.float()
        if keep:
            self._val = torch.cat(kept)

    # ---- loaders --------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        start = self.resume_batches
        return DataLoader(_Batches(lambda: self.train_batches(start)), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.val_batches), batch_size=None, num_workers=0)
