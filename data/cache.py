"""Cache activations of every snapshot of a model suite on the same corpus tokens, in the shard format.

    python -m data.cache model=pythia160m corpus=slimpajama cache.n_tokens=100_000_000

The corpus windows are tokenised first (into a small disk buffer), so a corpus too small for
``cache.n_tokens`` stops with an error before any model runs. They are cut into chunks of whole shards. For each chunk,
each snapshot model is loaded in turn (one
model in memory at a time), runs every window of the chunk, and writes its slice ``[:, :, s, :]`` into an
on-disk chunk buffer; once every snapshot is in, the chunk's shards are written. Progress is recorded after
each snapshot of a chunk and after each chunk, so a killed run continues where it stopped: finished shards
are checked against their sha256 and never recomputed. The manifest is written last; its presence means
the dataset is complete. The folder name carries a hash of everything that decides the content, so a
different configuration never reuses a cache.

Validation is split by document, with the rule of the live path (``data.corpus.heldout_documents``): the last
``cache.val_shards`` shards hold windows packed from the held-out documents only (every ``cache.heldout_every``-th
document of the corpus order), the shards before them windows of the other documents only, so no document
straddles the two. The manifest records the split (``split``) and the statistics of the training shards alone
(``train_stats``), which the trainer normalises with and initialises b_dec from.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.corpus import Window, heldout_documents
from data.format import (
    DTYPES,
    FORMAT_VERSION,
    SHARD_NAME,
    FormatError,
    Manifest,
    RunningStats,
    ShardEntry,
    ShardWriter,
    Snapshot,
    merged_stats,
    read_manifest,
    sha256_file,
    storage_dtype,
    to_storage,
    write_atomic,
    write_manifest,
)
from data.snapshots import activations, check_revisions, hook_point_name, load_snapshot, load_tokenizer, revision_step

PROGRESS = "progress.json"
WINDOWS = "windows.buffer"  # the corpus windows of this run, tokenised up front (removed once the cache is done)


def resolve_repo(model_cfg, cache_root: str | os.PathLike) -> str:
    """The suite's location: ``model.repo``, or the folder ``model.build`` builds (or finds built)."""
    if model_cfg.get("repo"):
        return str(model_cfg.repo)
    if model_cfg.get("build") is None:
        raise ValueError(f"model '{model_cfg.name}': set model.repo (a hub id or a local folder) or model.build")
    from hydra.utils import instantiate
    return str(instantiate(model_cfg.build, cache_dir=str(cache_root)))


def cache_folder(model_cfg, cache_cfg, corpus, repo: str, cache_root: str | os.PathLike) -> Path:
    # A local suite is named by its folder name (which carries its build hash), so the cache survives a
    # move of the cache root; a hub suite by its repo id.
    repo_key = Path(repo).name if Path(repo).is_dir() else repo
    key = dict(format=FORMAT_VERSION, repo=repo_key, revisions=list(model_cfg.revisions), layer=model_cfg.layer,
               hook=model_cfg.hook, context_length=model_cfg.context_length, corpus=corpus.config(),
               n_tokens=cache_cfg.n_tokens, dtype=cache_cfg.dtype, drop_first=cache_cfg.drop_first,
               samples_per_shard=cache_cfg.samples_per_shard, model_dtype=cache_cfg.model_dtype,
               # the validation rule: another rule gives other shards (caches from before it had no key here)
               split=dict(rule="heldout_documents", every=split_settings(cache_cfg)[1],
                          val_shards=split_settings(cache_cfg)[0]))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_root) / "activations" / f"{model_cfg.name}-{digest}"


def split_settings(cache_cfg) -> tuple[int, int]:
    """(val_shards, heldout_every) of a cache configuration (defaults 1 and 20, as data.heldout_every)."""
    return int(cache_cfg.get("val_shards", 1)), int(cache_cfg.get("heldout_every", 20))


def ensure_cached(model_cfg, cache_cfg, corpus, cache_root: str | os.PathLike) -> Path:
    """The dataset folder for this configuration: returned at once if complete, else built or resumed."""
    repo = resolve_repo(model_cfg, cache_root)
    check_revisions(repo, list(model_cfg.revisions))
    folder = cache_folder(model_cfg, cache_cfg, corpus, repo, cache_root)
    if (folder / "manifest.json").is_file():
        return folder
    cache = ActivationCache(folder, repo, model_cfg, cache_cfg, corpus)
    cache.check_disk()
    cache.run()
    return folder


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = folder.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


class ActivationCache:
    def __init__(self, folder: Path, repo: str, model_cfg, cache_cfg, corpus):
        if cache_cfg.dtype not in DTYPES:
            raise ValueError(f"cache.dtype: '{cache_cfg.dtype}' is not one of {DTYPES}")
        if not 0 <= cache_cfg.drop_first < model_cfg.context_length:
            raise ValueError(f"cache.drop_first: {cache_cfg.drop_first} must be in 0..{model_cfg.context_length - 1}")
        self.folder, self.repo, self.model_cfg, self.cfg, self.corpus = folder, repo, model_cfg, cache_cfg, corpus
        self.revisions = list(model_cfg.revisions)
        self.T = model_cfg.context_length - cache_cfg.drop_first  # tokens stored per window
        self.n_windows = math.ceil(cache_cfg.n_tokens / self.T)
        self.sps = cache_cfg.samples_per_shard
        self.n_shards = math.ceil(self.n_windows / self.sps)
        self.val_shards, self.heldout_every = split_settings(cache_cfg)
        heldout_documents(self.heldout_every, True)  # checks heldout_every >= 2
        if not 1 <= self.val_shards < self.n_shards:
            raise ValueError(f"cache.val_shards: {self.val_shards} must be in 1..{self.n_shards - 1}: cache.n_tokens="
                             f"{cache_cfg.n_tokens:,} fills {self.n_shards} shard(s) of {self.sps} windows")
        # windows [0, n_train) come from training documents, [n_train, n_windows) (the last val_shards shards,
        # the last one possibly partial) from held-out documents
        self.n_train = (self.n_shards - self.val_shards) * self.sps
        self.chunk_shards = max(1, cache_cfg.chunk_tokens // (self.sps * self.T))
        self.device = cache_cfg.device if cache_cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_dtype = getattr(torch, cache_cfg.model_dtype)

    # ---- disk ----------------------------------------------------------------------------------------
    def disk_bytes(self) -> dict[str, int]:
        """Bytes this cache takes on disk at its peak: the shards (values plus about 2 KiB of tar and .npy
        headers a window), one chunk buffer beside them, and the tokenised windows (4 bytes a token)."""
        S, D, width = len(self.revisions), self.model_cfg.d_model, 4 if self.cfg.dtype == "float32" else 2
        shards = self.n_windows * (self.T * S * D * width + 2048)
        chunk = min(self.chunk_shards * self.sps, self.n_windows) * self.T * S * D * width
        tokens = self.n_windows * self.model_cfg.context_length * 4
        return {"shards": shards, "chunk_buffer": chunk, "tokens": tokens, "total": shards + chunk + tokens}

    def check_disk(self) -> None:
        """State the disk the cache needs before any work, and stop if the folder's file system lacks it."""
        need = self.disk_bytes()
        present = sum(p.stat().st_size for p in self.folder.iterdir()) if self.folder.is_dir() else 0
        free = free_bytes(self.folder)
        tqdm.write(f"caching {self.n_windows * self.T:,} tokens x {len(self.revisions)} snapshots x "
                   f"{self.model_cfg.d_model} ({self.cfg.dtype}) needs {_gb(need['total'])} on disk in {self.folder} "
                   f"({_gb(need['shards'])} of shards, {_gb(need['chunk_buffer'])} chunk buffer); "
                   f"{_gb(free)} free")
        if need["total"] - present > free:
            raise FormatError(
                f"{self.folder}: caching needs {_gb(need['total'] - present)} more on disk, only {_gb(free)} free; "
                "train with data=live (no activations on disk), lower cache.n_tokens or cache.chunk_tokens, "
                "or set paths.cache_dir to a larger disk")

    # ---- progress ----------------------------------------------------------------------------------
    def _load_progress(self) -> dict:
        path = self.folder / PROGRESS
        if not path.is_file():
            return {"shards": [], "stats": [], "chunk_snapshots_done": []}
        progress = json.loads(path.read_text())
        for entry in progress["shards"]:  # finished shards are trusted only if intact
            if sha256_file(self.folder / entry["file"]) != entry["sha256"]:
                raise FormatError(f"{self.folder / entry['file']}: sha256 differs from {PROGRESS}; the cache is "
                                  f"damaged: delete {self.folder} to rebuild it")
        return progress

    def _save_progress(self, progress: dict) -> None:
        write_atomic(self.folder / PROGRESS, json.dumps(progress))

    # ---- the work ----------------------------------------------------------------------------------
    def run(self) -> Manifest:
        # gc.collect() after each snapshot frees the model's reference cycles; with the objects that exist before
        # the first model frozen it skips the long-lived ones (datasets, transformers): 0.29 s a call before.
        gc.freeze()
        try:
            return self._run()
        finally:
            gc.unfreeze()

    def _corpus_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every window the cache stores, tokenised up front: (tokens [N, context_length] int32, a disk buffer
        of 4 bytes a token against S x D x 2 for the activations; (doc, start) [N, 2]). The first ``n_train``
        are packed from the training documents, the rest from the held-out documents (``heldout_documents``).

        A corpus with fewer than the windows that cache.n_tokens needs stops here, before any model runs,
        instead of leaving short or empty shards (the folder's key promises n_tokens).
        """
        ctx = self.model_cfg.context_length
        tokenizer = load_tokenizer(self.repo, self.revisions[0])
        path = self.folder / WINDOWS
        tokens = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(self.n_windows, ctx))
        where = np.zeros((self.n_windows, 2), dtype=np.int64)
        have, capped = [], False
        for held_out, first, end in ((False, 0, self.n_train), (True, self.n_train, self.n_windows)):
            limit = end - first
            if held_out and have[0] < self.n_train:  # too small already: count what a smaller cache could use
                limit = max(limit, self.val_shards * self.sps)
            n = 0
            for w in self.corpus.windows(tokenizer, ctx, max_tokens=limit * ctx,
                                         documents=heldout_documents(self.heldout_every, held_out)):
                if first + n < end:
                    tokens[first + n], where[first + n] = w.tokens, (w.doc, w.start)
                n += 1
                if n == limit:
                    capped = held_out and limit > end - first
                    break
            have.append(n)
        if have[0] < self.n_train or have[1] < self.n_windows - self.n_train:
            del tokens
            path.unlink()
            if not any(self.folder.iterdir()):  # a fresh folder: leave no trace of the failed start
                self.folder.rmdir()
            corpus = ", ".join(f"{k}={v}" for k, v in self.corpus.config().items()
                               if k in ("source", "name", "split", "max_docs") and v is not None)
            most = self._most_windows(*have)
            raise ValueError(
                f"corpus too small for cache.n_tokens={self.cfg.n_tokens:,}: that needs {self.n_windows:,} windows of "
                f"{ctx} tokens ({self.T} stored from each), {self.n_train:,} from the training documents and "
                f"{self.n_windows - self.n_train:,} (cache.val_shards={self.val_shards}) from the held-out ones "
                f"(1 document in {self.heldout_every}, cache.heldout_every); the corpus ({corpus}) holds {have[0]:,} and "
                f"{have[1]:,}{'+' if capped else ''}; "
                + (f"set cache.n_tokens to at most {most * self.T:,} or use a larger corpus" if most
                   else "use a larger corpus"))
        tokens.flush()
        return tokens, where

    def _most_windows(self, have_train: int, have_val: int) -> int:
        """The most windows a cache of this shard layout can hold from the windows the corpus has."""
        v, sps = self.val_shards, self.sps
        train_shards = have_train // sps  # whole training shards
        if train_shards == 0 or have_val <= (v - 1) * sps:  # the last validation shard needs one window at least
            return 0
        return train_shards * sps + min(have_val, v * sps)

    def _run(self) -> Manifest:
        self.folder.mkdir(parents=True, exist_ok=True)
        progress = self._load_progress()
        tokens, where = self._corpus_windows()
        done_shards = len(progress["shards"])
        # a kill between recording a chunk's shards and deleting its buffer leaves the buffer behind: drop it now
        for stale in self.folder.glob("chunk-*.buffer"):
            if int(stale.stem.split("-")[1]) < done_shards:
                stale.unlink()
        S, D = len(self.revisions), self.model_cfg.d_model
        total = self.n_windows * self.T * S
        bar = tqdm(total=total, initial=min(done_shards * self.sps * self.T * S, total), unit="tok",
                   unit_scale=True, desc=f"caching {self.model_cfg.name}", dynamic_ncols=True)
        hook_point = None
        for first_shard in range(done_shards, self.n_shards, self.chunk_shards):
            n_shards = min(self.chunk_shards, self.n_shards - first_shard)
            first = first_shard * self.sps
            chunk = [Window(int(where[j, 0]), int(where[j, 1]), np.asarray(tokens[j]))
                     for j in range(first, min(first + n_shards * self.sps, self.n_windows))]
            ids = torch.from_numpy(np.stack([w.tokens for w in chunk])).long()
            buffer_path = self.folder / f"chunk-{first_shard:06d}.buffer"
            buffer = np.lib.format.open_memmap(buffer_path, mode="r+" if buffer_path.exists() else "w+",
                                               dtype=storage_dtype(self.cfg.dtype), shape=(len(chunk), self.T, S, D))
            for s, revision in enumerate(self.revisions):
                if revision in progress["chunk_snapshots_done"]:
                    bar.update(len(chunk) * self.T)
                    continue
                model = load_snapshot(self.repo, revision, self.model_dtype, self.device)
                hook_point = hook_point or hook_point_name(model, self.model_cfg.layer, self.model_cfg.hook)
                for i in range(0, len(chunk), self.cfg.batch_size):
                    acts = activations(model, ids[i:i + self.cfg.batch_size], self.model_cfg.layer, self.model_cfg.hook)
                    acts = acts[:, self.cfg.drop_first:].float().cpu().numpy()
                    if acts.shape[-1] != D:
                        raise FormatError(f"{self.repo}/{revision}: hook output has width {acts.shape[-1]}, "
                                          f"model.d_model says {D}")
                    if not np.isfinite(acts).all():
                        raise FormatError(f"{self.repo}/{revision}: NaN/Inf activations at the hook")
                    try:
                        buffer[i:i + len(acts), :, s] = to_storage(acts, self.cfg.dtype)
                    except FormatError as e:
                        raise FormatError(f"{revision}: {e}") from None
                    bar.update(len(acts) * self.T)
                buffer.flush()
                progress["chunk_snapshots_done"].append(revision)
                self._save_progress(progress)
                del model
                gc.collect()
            for k in range(n_shards):
                entry, stats = self._write_shard(first_shard + k, buffer, chunk, k)
                progress["shards"].append(entry.__dict__)
                progress["stats"].append(stats.to_json())
            progress["chunk_snapshots_done"] = []
            self._save_progress(progress)
            del buffer
            buffer_path.unlink()
        bar.close()
        del tokens
        (self.folder / WINDOWS).unlink()
        return self._finish(progress, hook_point)

    def _write_shard(self, index: int, buffer: np.ndarray, chunk: list, k: int) -> tuple[ShardEntry, RunningStats]:
        writer = ShardWriter(self.folder / SHARD_NAME.format(index), len(self.revisions), self.model_cfg.d_model,
                             self.T, self.cfg.dtype)
        for j in range(k * self.sps, min((k + 1) * self.sps, len(chunk))):
            w = chunk[j]
            writer.write(np.asarray(buffer[j]), w.tokens[self.cfg.drop_first:],  # stored values, written as they are
                         doc=w.doc, start=w.start + self.cfg.drop_first)
        return writer.close()

    def _finish(self, progress: dict, hook_point: str | None) -> Manifest:
        parts = [RunningStats.from_json(s) for s in progress["stats"]]
        n_train_shards = self.n_shards - self.val_shards
        stats, train_stats = merged_stats(parts), merged_stats(parts[:n_train_shards])
        if hook_point is None:  # everything was cached before a restart: name the hook without a model
            hook_point = f"layers.{self.model_cfg.layer}.{self.model_cfg.hook}"
        manifest = Manifest(
            model=self.repo if not Path(self.repo).is_dir() else f"{self.model_cfg.name} ({self.repo})",
            hook_point=f"{hook_point} ({self.model_cfg.hook})", d_model=self.model_cfg.d_model,
            snapshots=[Snapshot(r, revision_step(r)) for r in self.revisions], dtype=self.cfg.dtype,
            tokens_per_sample=self.T, shards=[ShardEntry(**e) for e in progress["shards"]],
            stats=stats.snapshot_stats(self.revisions), train_stats=train_stats.snapshot_stats(self.revisions),
            split={"val_shards": self.val_shards, "rule": "heldout_documents", "heldout_every": self.heldout_every,
                   "documents": f"the last {self.val_shards} shard(s) hold windows of the held-out documents only "
                                f"(corpus document index % {self.heldout_every} == {self.heldout_every - 1}), the "
                                "others windows of the other documents only"},
            extra={"repo": self.repo, "layer": self.model_cfg.layer, "hook": self.model_cfg.hook,
                   "context_length": self.model_cfg.context_length, "drop_first": self.cfg.drop_first,
                   "corpus": self.corpus.config(), "tokenizer": str(Path(self.repo) / self.revisions[0])
                   if Path(self.repo).is_dir() else self.repo})
        write_manifest(self.folder, manifest)
        return read_manifest(self.folder)


def bytes_per_token(folder: str | os.PathLike) -> tuple[float, float]:
    """(bytes on disk per token, the floor: bytes of one stored value x S x D)."""
    m = read_manifest(folder)
    size = sum((Path(folder) / e.file).stat().st_size for e in m.shards)
    width = 4 if m.dtype == "float32" else 2
    return size / m.n_tokens, width * len(m.snapshots) * m.d_model


if __name__ == "__main__":
    import hydra
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

    from cli import one_line_errors, quiet_library_noise

    @hydra.main(config_path="../conf", config_name="train", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        quiet_library_noise()
        start = time.time()
        with one_line_errors():
            folder = ensure_cached(cfg.model, cfg.cache, instantiate(cfg.corpus), cfg.paths.cache_dir)
        per_token, floor = bytes_per_token(folder)
        print(f"{folder}\n{read_manifest(folder).n_tokens:,} tokens, {per_token:.1f} bytes/token on disk "
              f"({per_token / floor:.3f}x the floor of {floor:.0f}); {time.time() - start:.0f}s")

    main()
