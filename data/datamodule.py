"""Streams cached activation shards as shuffled float32 batches ``[B, S, D]``.

The pipeline is a webdataset ``DataPipeline``:

    shard list (reshuffled every epoch, repeats forever for training)
      -> split_by_node (DDP ranks) -> split_by_worker (DataLoader workers)
      -> read + verify each shard, select snapshots   -> context windows [T, S, D]
      -> token-level shuffle buffer                    -> batches [B, S, D]

Normalisation is not applied here: the datamodule reports the per-snapshot scale (from the manifest's
statistics) and the crosscoder applies it, so the scale is stored with the weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from data.format import FormatError, Manifest, ShardEntry, from_storage, read_manifest, read_shard


class EpochShards(IterableDataset):
    """The shard list as webdataset source dicts; a new permutation each epoch, forever if ``repeat``."""

    def __init__(self, folder: Path, shards: list[ShardEntry], seed: int, shuffle: bool, repeat: bool):
        self.folder, self.shards, self.seed, self.shuffle, self.repeat = folder, shards, seed, shuffle, repeat

    def __iter__(self) -> Iterator[dict]:
        epoch = 0
        while True:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(order)
            for i in order:
                entry = self.shards[i]
                yield {"url": str(self.folder / entry.file), "entry": entry, "epoch": epoch}
            epoch += 1
            if not self.repeat:
                return


def read_windows(manifest: Manifest, snapshot_idx: list[int], verify: bool):
    """webdataset stage: shard source dicts -> (epoch, context windows [T, S_selected, D] in storage dtype)."""
    select_all = snapshot_idx == list(range(len(manifest.snapshots)))

    def stage(sources: Iterator[dict]) -> Iterator[tuple[int, np.ndarray]]:
        for src in sources:
            for acts, _tokens, _meta in read_shard(Path(src["url"]), src["entry"], manifest, verify=verify):
                yield src["epoch"], acts if select_all else acts[:, snapshot_idx]
    return stage


def shuffle_batches(batch_size: int, buffer_tokens: int, seed: int, dtype: str, drop_last: bool):
    """webdataset stage: windows -> float32 batches [B, S, D], shuffled at the token level.

    A mixing buffer (as in SAELens): fill it, permute, hand out the first half as batches, keep the
    second half; so each token is mixed with about ``buffer_tokens`` others from several shards. At an
    epoch boundary the buffer is emptied (but for a remainder smaller than one batch, which leads the
    next epoch), so the batches of one epoch hold each of its tokens exactly once.
    ``buffer_tokens=0`` keeps the stored order (validation).
    """
    shuffled = buffer_tokens > 0

    def stage(windows: Iterator[tuple[int, np.ndarray]]) -> Iterator[torch.Tensor]:
        rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng((seed, rank, worker))
        buf: np.ndarray | None = None
        filled = 0
        capacity = max(buffer_tokens, batch_size)
        current_epoch = 0

        def emit(n: int) -> Iterator[torch.Tensor]:
            """Hand out n (a multiple of batch_size) buffered tokens; keep the rest."""
            nonlocal filled
            order = rng.permutation(filled) if shuffled else np.arange(filled)
            out = buf[order[:n]]
            keep = buf[order[n:filled]]
            filled = len(keep)
            buf[:filled] = keep
            for i in range(0, n, batch_size):
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
                 shuffle_buffer: int = 262_144, val_shards: int = 1, val_tokens: int | None = 262_144,
                 num_workers: int = 1, verify_sha256: bool = True, seed: int = 0):
        super().__init__()
        self.path = Path(path) if path is not None else None
        self.snapshot_selection = list(snapshots) if snapshots is not None else None
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.val_shards, self.val_tokens = val_shards, val_tokens
        self.num_workers, self.verify, self.seed = num_workers, verify_sha256, seed
        self.manifest: Manifest | None = None

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
        if self.val_shards >= len(m.shards):
            raise FormatError(f"{self.path}: {len(m.shards)} shard(s) cannot hold out data.val_shards={self.val_shards} "
                              "and still leave training data")
        # The last shards are held out, so the split is stable and never depends on the seed.
        cut = len(m.shards) - self.val_shards
        self.train_entries, self.val_entries = m.shards[:cut], m.shards[cut:]

    @property
    def snapshot_names(self) -> list[str]:
        return [self.manifest.snapshots[i].name for i in self.snapshot_idx]

    @property
    def n_snapshots(self) -> int:
        return len(self.snapshot_idx)

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    def norm_scale(self) -> torch.Tensor:
        """[S]: factor that brings each snapshot's mean activation norm to sqrt(D) (as in the paper)."""
        norms = torch.tensor([self.manifest.stats[n].mean_norm for n in self.snapshot_names], dtype=torch.float64)
        return (math.sqrt(self.d_model) / norms).float()

    def raw_mean(self) -> torch.Tensor:
        """[S, D]: mean raw activation per snapshot."""
        return torch.tensor([self.manifest.stats[n].mean for n in self.snapshot_names], dtype=torch.float32)

    # ---- loaders ------------------------------------------------------------------------------------
    def _pipeline(self, entries: list[ShardEntry], train: bool) -> wds.DataPipeline:
        return wds.DataPipeline(
            EpochShards(self.path, entries, self.seed, shuffle=train, repeat=train),
            wds.split_by_node,
            wds.split_by_worker,
            read_windows(self.manifest, self.snapshot_idx, self.verify),
            *([] if train else [_limit_tokens(self.val_tokens)]),
            shuffle_batches(self.batch_size, self.shuffle_buffer if train else 0, self.seed,
                            self.manifest.dtype, drop_last=train),
        )

    def _loader(self, entries: list[ShardEntry], train: bool) -> DataLoader:
        workers = min(self.num_workers, len(entries))
        return DataLoader(self._pipeline(entries, train), batch_size=None, num_workers=workers,
                          persistent_workers=train and workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_entries, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_entries, train=False)


def _limit_tokens(max_tokens: int | None):
    def stage(windows):
        seen = 0
        for item in windows:
            if max_tokens is not None and seen >= max_tokens:
                return
            seen += len(item[1])
            yield item
    return stage
