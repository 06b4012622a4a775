"""Streams cached activation shards as shuffled float32 batches ``[B, S, D]``.

The pipeline is a webdataset ``DataPipeline``:

    shard list (reshuffled every epoch, repeats forever for training)
      -> an equal share of the windows for each (DDP rank, DataLoader worker)
      -> read + verify each shard, select snapshots   -> context windows [T, S, D]
      -> token-level shuffle buffer                    -> batches [B, S, D]

Normalisation is not applied here: the datamodule reports the per-snapshot scale (from the manifest's
statistics over the training shards, ``train_stats``) and the crosscoder applies it, so the scale is stored
with the weights. Validation is the last shards: as many as the manifest's ``split`` records (the cache writes
them from held-out documents only), or ``data.val_shards`` for a dataset that records no split.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from data.format import (
    MANIFEST_NAME,
    FormatError,
    Manifest,
    ShardEntry,
    SnapshotStats,
    from_storage,
    read_manifest,
    read_shard,
    val_shard_count,
)

log = logging.getLogger(__name__)


def slot_ranges(counts: list[int], slot: int, n_slots: int) -> list[tuple[int, int, int]]:
    """Split windows laid end to end (shard i holds counts[i]) into n_slots contiguous, near-equal parts.

    Returns slot's part as (shard position, first window, end window) triples. Every window belongs to
    exactly one slot, so an epoch over all slots sees each token once, whatever the shard count.
    """
    total = sum(counts)
    lo, hi = total * slot // n_slots, total * (slot + 1) // n_slots
    out, offset = [], 0
    for i, n in enumerate(counts):
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            out.append((i, a, b))
        offset += n
    return out


def stream_worker(consumed: int = 0) -> tuple[int, int, int, int, int]:
    """(rank, world, stream, n_workers, to_skip) for this DataLoader worker when ``consumed`` batches of the
    stream were handed out before (a resume).

    The DataLoader takes batches from its workers in turn, always starting at worker 0: in an uninterrupted
    run batch b comes from worker b % n as that worker's (b // n)-th batch. So a fresh loader continues the
    stream exactly only if its worker w plays the part of the original worker (consumed + w) % n (its shard
    share and its shuffle seed: ``stream``) and drops the (consumed + w) // n batches that worker had already
    handed out (``to_skip``). Resumed batch j = w + n*i then equals original batch consumed + j.
    """
    rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
    return rank, world, (consumed + worker) % n_workers, n_workers, (consumed + worker) // n_workers


class ShardWindows(IterableDataset):
    """webdataset source: which windows of which shards this (rank, worker) reads, epoch after epoch.

    Each epoch permutes the shards (seeded by the epoch) and gives every (DDP rank, DataLoader worker)
    slot a contiguous, equal share of the windows (instead of whole shards, which would need a shard
    count divisible by ranks x workers to see every token exactly once). ``consumed`` (resuming) rotates
    which worker reads which share, see ``stream_worker``.
    """

    def __init__(self, folder: Path, shards: list[ShardEntry], seed: int, shuffle: bool, repeat: bool,
                 max_windows: int | None = None, consumed: int = 0):
        self.folder, self.shards, self.seed = folder, shards, seed
        self.shuffle, self.repeat, self.max_windows, self.consumed = shuffle, repeat, max_windows, consumed

    def __iter__(self) -> Iterator[dict]:
        rank, world, stream, n_workers, _ = stream_worker(self.consumed)
        slot, n_slots = rank * n_workers + stream, world * n_workers
        epoch = 0
        while True:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(order)
            counts = [self.shards[i].samples for i in order]
            if self.max_windows is not None:  # a prefix of the (unshuffled) stream, e.g. for validation
                counts = list(np.diff(np.minimum(np.cumsum([0] + counts), self.max_windows)))
            for pos, first, end in slot_ranges(counts, slot, n_slots):
                entry = self.shards[order[pos]]
                yield {"url": str(self.folder / entry.file), "entry": entry, "epoch": epoch,
                       "first": first, "end": end}
            epoch += 1
            if not self.repeat:
                return


def read_windows(manifest: Manifest, snapshot_idx: list[int], verify: bool, on_corrupt: str = "error",
                 skipped=None):
    """webdataset stage: shard parts -> (epoch, context windows [T, S_selected, D] in storage dtype).

    on_corrupt="skip" drops a shard that fails its checks (counting it in ``skipped``, a shared
    multiprocessing value) instead of stopping; its windows read before the fault are kept.
    """
    select_all = snapshot_idx == list(range(len(manifest.snapshots)))

    def stage(sources: Iterator[dict]) -> Iterator[tuple[int, np.ndarray]]:
        for src in sources:
            try:
                for i, (acts, _tokens, _meta) in enumerate(read_shard(Path(src["url"]), src["entry"], manifest, verify=verify)):
                    if src["first"] <= i < src["end"]:
                        yield src["epoch"], acts if select_all else acts[:, snapshot_idx]
                    elif i >= src["end"]:
                        break
            except FormatError as e:
                if on_corrupt != "skip":
                    raise
                log.warning("skipping shard: %s", e)
                if skipped is not None:
                    with skipped.get_lock():
                        skipped.value += 1
    return stage


def shuffle_batches(batch_size: int, buffer_tokens: int, seed: int, dtype: str, drop_last: bool,
                    skip_batches: int = 0):
    """webdataset stage: windows -> float32 batches [B, S, D], shuffled at the token level.

    A mixing buffer (as in SAELens): fill it, permute, hand out the first half as batches, keep the
    second half; so each token is mixed with about ``buffer_tokens`` others from several shards. At an
    epoch boundary the buffer is emptied (but for a remainder smaller than one batch, which leads the
    next epoch), so the batches of one epoch hold each of its tokens exactly once.
    ``buffer_tokens=0`` keeps the stored order (validation).

    ``skip_batches`` (resuming: the batches the DataLoader already handed out) replays the stream and drops
    what was handed out; the DataLoader restarts its round-robin at worker 0, so worker w continues the
    stream of the original worker (skip_batches + w) % n (``stream_worker``). Replaying instead of seeking
    keeps the resumed stream identical to the uninterrupted one, for any number of workers.
    """
    shuffled = buffer_tokens > 0

    def stage(windows: Iterator[tuple[int, np.ndarray]]) -> Iterator[torch.Tensor]:
        rank, _, stream, _, to_skip = stream_worker(skip_batches)
        rng = np.random.default_rng((seed, rank, stream))
        buf: np.ndarray | None = None
        filled = 0
        capacity = max(buffer_tokens, batch_size)
        current_epoch = 0

        def emit(n: int) -> Iterator[torch.Tensor]:
            """Hand out n (a multiple of batch_size) buffered tokens; keep the rest."""
            nonlocal filled, to_skip
            order = rng.permutation(filled) if shuffled else np.arange(filled)
            out = buf[order[:n]]
            keep = buf[order[n:filled]]
            filled = len(keep)
            buf[:filled] = keep
            for i in range(0, n, batch_size):
                if to_skip:
                    to_skip -= 1
                    continue
                yield torch.from_numpy(from_storage(out[i:i + batch_size], dtype).copy())

        for epoch, acts in windows:
            if buf is None:
                buf = np.empty((capacity + acts.shape[0], *acts.shape[1:]), dtype=acts.dtype)
            if epoch != current_epoch:
                current_epoch = epoch
                yield from emit(filled // batch_size * batch_size)
            buf[filled:filled + len(acts)] = acts
            filled += len(acts)
            if filled >= capacity:
                half = (filled // 2 if shuffled else filled) // batch_size * batch_size
                yield from emit(max(half, batch_size))
        if buf is not None:
            yield from emit(filled // batch_size * batch_size)
            if filled and not drop_last:
                yield torch.from_numpy(from_storage(buf[:filled], dtype).copy())
    return stage


class ActivationDataModule(L.LightningDataModule):
    """Cached multi-snapshot activations from a dataset folder (see docs/FORMAT.md)."""

    def __init__(self, path: str | None, snapshots: list[str] | None = None, batch_size: int = 4096,
                 shuffle_buffer: int = 262_144, val_shards: int | None = None, val_tokens: int | None = 262_144,
                 num_workers: int = 1, verify_sha256: bool = True, on_corrupt: str = "error", seed: int = 0):
        super().__init__()
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt: '{on_corrupt}' is not one of ('error', 'skip')")
        self.path = Path(path) if path is not None else None
        self.snapshot_selection = list(snapshots) if snapshots is not None else None
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.val_shards, self.val_tokens = val_shards, val_tokens
        self.num_workers, self.verify, self.on_corrupt, self.seed = num_workers, verify_sha256, on_corrupt, seed
        self.manifest: Manifest | None = None
        self.resume_batches = 0  # training batches this rank consumed before a resume
        # shards skipped as corrupt, counted across DataLoader worker processes
        self.skipped_shards = multiprocessing.get_context("fork").Value("i", 0)

    # ---- what the model needs to know about the data -------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        if self.path is None:
            raise FormatError("data.path is not set: point it at a folder of activation shards")
        self.manifest = m = read_manifest(self.path)
        self.snapshot_idx = m.snapshot_indices(self.snapshot_selection)
        for e in m.shards:
            if not (self.path / e.file).is_file():
                raise FormatError(f"{self.path / e.file}: listed in manifest.json but missing")
        where = str(self.path / MANIFEST_NAME)
        n_val = val_shard_count(m, self.val_shards, where)
        if n_val >= len(m.shards) or n_val < 1:
            raise FormatError(f"{self.path}: {len(m.shards)} shard(s) cannot hold out data.val_shards={n_val} "
                              "and still leave training data")
        # The last shards are held out, so the split is stable and never depends on the seed.
        cut = len(m.shards) - n_val
        self.train_entries, self.val_entries = m.shards[:cut], m.shards[cut:]
        # Normalisation and b_dec's initialisation: statistics of the training shards only.
        self.stats: dict[str, SnapshotStats] = m.train_stats if m.train_stats is not None else m.stats
        if m.train_stats is None:
            log.warning("%s: no training-shard statistics ('train_stats'; an older cache or a hand-written "
                        "dataset): the normalisation scale and b_dec's initialisation use 'stats', which include "
                        "the %d validation shard(s)%s", where, n_val,
                        "" if m.split is not None else ", and no recorded 'split' says the validation shards "
                        "share no document with the training shards; re-cache to fix both")

    @property
    def snapshot_names(self) -> list[str]:
        return [self.manifest.snapshots[i].name for i in self.snapshot_idx]

    @property
    def n_snapshots(self) -> int:
        return len(self.snapshot_idx)

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def train_tokens_per_epoch(self) -> int:
        return sum(e.tokens for e in self.train_entries)

    def norm_scale(self) -> torch.Tensor:
        """[S]: factor that brings each snapshot's mean activation norm over the training shards to sqrt(D)
        (as in the paper)."""
        norms = torch.tensor([self.stats[n].mean_norm for n in self.snapshot_names], dtype=torch.float64)
        return (math.sqrt(self.d_model) / norms).float()

    def raw_mean(self) -> torch.Tensor:
        """[S, D]: mean raw activation per snapshot, over the training shards."""
        return torch.tensor([self.stats[n].mean for n in self.snapshot_names], dtype=torch.float32)

    # ---- position in the stream, saved in Lightning checkpoints ------------------------------------
    def state_dict(self) -> dict:
        # batches that went through a training step (checkpoints are saved after the step's batch end)
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed if self.trainer is not None else 0
        return {"batches": int(consumed), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("batch_size")) != (self.seed, self.batch_size):
            raise ValueError(f"resuming with data.seed={self.seed}, data.batch_size={self.batch_size}, but the "
                             f"checkpoint was trained with seed={state.get('seed')}, batch_size={state.get('batch_size')}")
        self.resume_batches = int(state["batches"])

    # ---- loaders ------------------------------------------------------------------------------------
    def _pipeline(self, entries: list[ShardEntry], train: bool) -> wds.DataPipeline:
        max_windows = None
        if not train and self.val_tokens is not None:
            max_windows = max(1, math.ceil(self.val_tokens / self.manifest.tokens_per_sample))
        consumed = self.resume_batches if train else 0
        return wds.DataPipeline(
            ShardWindows(self.path, entries, self.seed, shuffle=train, repeat=train, max_windows=max_windows,
                         consumed=consumed),
            read_windows(self.manifest, self.snapshot_idx, self.verify, self.on_corrupt, self.skipped_shards),
            shuffle_batches(self.batch_size, self.shuffle_buffer if train else 0, self.seed, self.manifest.dtype,
                            drop_last=train, skip_batches=consumed),
        )

    def _loader(self, entries: list[ShardEntry], train: bool) -> DataLoader:
        workers = self.num_workers if train else min(self.num_workers, 1)
        return DataLoader(self._pipeline(entries, train), batch_size=None, num_workers=workers,
                          persistent_workers=train and workers > 0, pin_memory=torch.cuda.is_available(),
                          multiprocessing_context="fork" if workers > 0 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_entries, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_entries, train=False)
