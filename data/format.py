"""The activation shard format: the one place it is defined (prose version: docs/FORMAT.md).

A dataset is a folder holding ``manifest.json`` and webdataset tar shards ``shard-000000.tar``, ...
Each sample is one context window of T tokens seen by S snapshots of one model:

- ``acts.npy``   ``[T, S, D]`` float16 / float32 (bfloat16 is stored as its uint16 bit pattern)
- ``tokens.npy`` ``[T]`` int32, the same tokens for every snapshot
- ``json``       ``{"doc": <source document id>, "start": <position of token 0 in that document>}``

Writers here never leave a half-written file under its final name: shards and the manifest are
written to ``*.tmp`` and renamed once complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
DTYPES = ("float16", "float32", "bfloat16")


class FormatError(ValueError):
    """A dataset, manifest or shard that does not follow the format. The message names the file."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    name: str  # revision name, e.g. "step1000"
    step: int  # training step of that revision


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    file: str  # file name relative to the dataset folder
    samples: int  # context windows in the shard
    tokens: int  # samples * tokens_per_sample
    sha256: str  # hex digest of the whole tar file


@dataclasses.dataclass
class SnapshotStats:
    """Per-snapshot statistics of the raw (un-normalised) activations, so normalising needs no pass."""

    mean_norm: float  # mean L2 norm of one activation vector
    mean: list[float]  # mean activation vector [D]


@dataclasses.dataclass
class Manifest:
    """A dataset's manifest.json. ``split`` and ``train_stats`` are optional (older manifests lack them):
    ``split`` records that the last ``split["val_shards"]`` shards are validation data kept apart from the
    training shards by the writer (the cache: held-out documents), ``train_stats`` the statistics over the
    other (training) shards only, which the trainer normalises with."""

    model: str  # e.g. "EleutherAI/pythia-160m"
    hook_point: str  # e.g. "gpt_neox.layers.6" (residual stream after block 6)
    snapshots: list[Snapshot]
    d_model: int
    dtype: str
    tokens_per_sample: int
    shards: list[ShardEntry]
    stats: dict[str, SnapshotStats]  # keyed by snapshot name
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # free-form provenance
    split: dict[str, Any] | None = None  # {"val_shards": N, "rule": ..., ...}: the last N shards are validation
    train_stats: dict[str, SnapshotStats] | None = None  # like stats, over the training shards only

    @property
    def recorded_val_shards(self) -> int | None:
        """How many (last) shards the writer held out for validation; None when the manifest does not say."""
        return None if self.split is None else int(self.split["val_shards"])

    @property
    def snapshot_names(self) -> list[str]:
        return [s.name for s in self.snapshots]

    @property
    def n_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def snapshot_indices(self, names: list[str] | None) -> list[int]:
        """Positions of ``names`` on the S axis of ``acts.npy``; None selects every snapshot."""
        all_names = self.snapshot_names
        if names is None:
            return list(range(len(all_names)))
        missing = [n for n in names if n not in all_names]
        if missing:
            raise FormatError(
                f"data.snapshots: {missing} not in the cached snapshots {all_names}")
        if len(set(names)) != len(names):
            raise FormatError(f"data.snapshots: {list(names)} names a snapshot twice")
        return [all_names.index(n) for n in names]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stats"] = {k: dataclasses.asdict(v) for k, v in self.stats.items()}
        for key in ("split", "train_stats"):  # optional: absent rather than null
            if d[key] is None:
                del d[key]
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        def need(key: str, kind: type | tuple[type, ...], obj: dict = d, prefix: str = "") -> Any:
            if key not in obj:
                raise FormatError(f"{where}: missing key '{prefix}{key}'")
            value = obj[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise FormatError(f"{where}: key '{prefix}{key}' has {type(value).__name__} {value!r}")
            return value

        version = need("format_version", int)
        if version != FORMAT_VERSION:
            raise FormatError(f"{where}: format_version {version} is not supported (this code reads {FORMAT_VERSION})")
        d_model = need("d_model", int)
        dtype = need("dtype", str)
        if dtype not in DTYPES:
            raise FormatError(f"{where}: dtype '{dtype}' is not one of {DTYPES}")
        snapshots = []
        for i, s in enumerate(need("snapshots", list)):
            if not isinstance(s, dict):
                raise FormatError(f"{where}: snapshots[{i}] is not an object")
            snapshots.append(Snapshot(name=need("name", str, s, f"snapshots[{i}]."),
                                      step=need("step", int, s, f"snapshots[{i}].")))
        if not snapshots:
            raise FormatError(f"{where}: 'snapshots' is empty")
        names = [s.name for s in snapshots]
        if len(set(names)) != len(names):
            raise FormatError(f"{where}: snapshot names repeat: {names}")
        shards = []
        for i, e in enumerate(need("shards", list)):
            p = f"shards[{i}]."
            shards.append(ShardEntry(file=need("file", str, e, p), samples=need("samples", int, e, p),
                                     tokens=need("tokens", int, e, p), sha256=need("sha256", str, e, p)))
        def read_stats(key: str) -> dict[str, SnapshotStats]:
            stats_json = need(key, dict)
            stats = {}
            for name in names:
                if name not in stats_json:
                    raise FormatError(f"{where}: missing key '{key}.{name}'")
                s = stats_json[name]
                mean = need("mean", list, s, f"{key}.{name}.")
                if len(mean) != d_model:
                    raise FormatError(f"{where}: {key}.{name}.mean has {len(mean)} values, d_model is {d_model}")
                mean_norm = float(need("mean_norm", (int, float), s, f"{key}.{name}."))
                if not math.isfinite(mean_norm) or mean_norm <= 0:
                    raise FormatError(f"{where}: {key}.{name}.mean_norm is {mean_norm}; it must be finite and > 0")
                stats[name] = SnapshotStats(mean_norm=mean_norm, mean=[float(x) for x in mean])
            return stats

        stats = read_stats("stats")
        split = d.get("split")
        if split is not None:
            split = need("split", dict)
            n_val = need("val_shards", int, split, "split.")
            if not 1 <= n_val < len(shards):
                raise FormatError(f"{where}: split.val_shards is {n_val}; it must be in 1..{len(shards) - 1} "
                                  f"(the dataset has {len(shards)} shards)")
        train_stats = None
        if d.get("train_stats") is not None:
            if split is None:
                raise FormatError(f"{where}: 'train_stats' needs a 'split' saying which shards are training data")
            train_stats = read_stats("train_stats")
        tps = need("tokens_per_sample", int)
        for i, e in enumerate(shards):
            if e.tokens != e.samples * tps:
                raise FormatError(f"{where}: shards[{i}] ({e.file}) has tokens={e.tokens}, "
                                  f"but samples x tokens_per_sample = {e.samples * tps}")
        return cls(model=need("model", str), hook_point=need("hook_point", str), snapshots=snapshots,
                   d_model=d_model, dtype=dtype, tokens_per_sample=tps, shards=shards, stats=stats,
                   format_version=version, extra=d.get("extra", {}), split=split, train_stats=train_stats)


def val_shard_count(manifest: Manifest, requested: int | None, where: str) -> int:
    """How many of the last shards are validation: the dataset's recorded split (``requested`` None or equal
    to it), else ``requested`` (default 1) for a dataset that records none (written by hand or by an older cache).

    A requested count that differs from the recorded split stops: fewer would train on held-out documents, more
    would validate on shards the training statistics were computed from."""
    recorded = manifest.recorded_val_shards
    if recorded is None:
        return 1 if requested is None else int(requested)
    if requested is not None and int(requested) != recorded:
        raise FormatError(f"{where}: data.val_shards={requested}, but this dataset holds out its last {recorded} "
                          f"shard(s) for validation ('split': {manifest.split.get('rule', 'recorded')}); set "
                          f"data.val_shards=null (or {recorded})")
    return recorded


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise FormatError(f"{folder}: no such dataset folder")
    if not path.is_file():
        raise FormatError(f"{path}: missing (a dataset folder needs a {MANIFEST_NAME})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return Manifest.from_json(raw, where=str(path))


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer to write to; synced and renamed onto ``path`` when the block ends
    (removed if it raises), so readers see either the old file or the whole new one. ``suffix`` keeps an extension
    a writer insists on (np.savez appends .npz to any other name)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + suffix)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    write_atomic(Path(folder) / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of ``acts.npy`` for a manifest dtype (bfloat16: its uint16 bit pattern)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def to_storage(acts: np.ndarray, dtype: str) -> np.ndarray:
    """Cast activations to the on-disk dtype; bfloat16 becomes its uint16 bit pattern (numpy lacks it)."""
    if dtype == "bfloat16":
        import torch
        as_bf16 = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).to(torch.bfloat16)
        return as_bf16.view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # overflow is reported below, with the value that caused it
        out = acts.astype(dtype, copy=False)
    if dtype == "float16" and not np.isfinite(out).all() and np.isfinite(acts).all():
        raise FormatError(f"activations exceed the float16 range (max |a| = {np.abs(acts).max():.4g}); "
                          "store them as bfloat16 or float32")
    return out


class RunningStats:
    """Sums from which per-snapshot mean norm and mean vector follow; mergeable across shards."""

    def __init__(self, n_snapshots: int, d_model: int):
        self.count = 0
        self.norm_sum = np.zeros(n_snapshots, dtype=np.float64)
        self.vec_sum = np.zeros((n_snapshots, d_model), dtype=np.float64)

    def update(self, acts: np.ndarray) -> None:
        """acts: [T, S, D] float32, the stored values (so statistics describe exactly what readers get back).

        Squares and per-vector sums in float32 (exact to ~1e-7 relative for one vector of D values), the sums
        over tokens in float64: a float64 copy of every window cost more than writing it (cProfile)."""
        self.count += acts.shape[0]
        self.norm_sum += np.sqrt(np.einsum("tsd,tsd->ts", acts, acts)).sum(0, dtype=np.float64)
        self.vec_sum += acts.sum(0, dtype=np.float64)

    def merge(self, other: "RunningStats") -> None:
        self.count += other.count
        self.norm_sum += other.norm_sum
        self.vec_sum += other.vec_sum

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "norm_sum": self.norm_sum.tolist(), "vec_sum": self.vec_sum.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunningStats":
        vec = np.asarray(d["vec_sum"], dtype=np.float64)
        out = cls(*vec.shape)
        out.count, out.norm_sum, out.vec_sum = int(d["count"]), np.asarray(d["norm_sum"], np.float64), vec
        return out

    def snapshot_stats(self, names: list[str]) -> dict[str, SnapshotStats]:
        if self.count == 0:
            raise FormatError("no tokens were written, so no activation statistics exist")
        return {n: SnapshotStats(mean_norm=float(self.norm_sum[i] / self.count),
                                 mean=(self.vec_sum[i] / self.count).tolist()) for i, n in enumerate(names)}


def merged_stats(parts: list[RunningStats]) -> RunningStats:
    out = RunningStats(*parts[0].vec_sum.shape)
    for p in parts:
        out.merge(p)
    return out


class _Hashing:
    """A write-only file object that feeds every byte written through it to a hash as well."""

    def __init__(self, file, hash_):
        self.file, self.hash = file, hash_

    def write(self, data) -> int:
        self.hash.update(data)
        return self.file.write(data)


class ShardWriter:
    """Writes one shard to ``<file>.tmp`` and renames it when closed."""

    def __init__(self, path: str | os.PathLike, n_snapshots: int, d_model: int, tokens_per_sample: int,
                 dtype: str = "float16"):
        if dtype not in DTYPES:
            raise FormatError(f"dtype '{dtype}' is not one of {DTYPES}")
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.shape = (tokens_per_sample, n_snapshots, d_model)
        self.dtype = dtype
        self.samples = 0
        self.stats = RunningStats(n_snapshots, d_model)
        self._file = open(self.tmp, "wb")
        self._sha256 = hashlib.sha256()  # of the bytes as they are written: no second pass over the file
        self._tar = tarfile.open(fileobj=_Hashing(self._file, self._sha256), mode="w|")

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(payload))

    def write(self, acts: np.ndarray, tokens: np.ndarray, doc: int | str, start: int) -> None:
        """acts: [T, S, D] activations of one context window, in any float dtype or already in the storage dtype
        (``storage_dtype``: then written as they are); tokens: [T] its token ids."""
        if acts.shape != self.shape:
            raise FormatError(f"{self.path.name}: acts has shape {tuple(acts.shape)}, expected {self.shape} [T, S, D]")
        if tokens.shape != self.shape[:1]:
            raise FormatError(f"{self.path.name}: tokens has shape {tuple(tokens.shape)}, expected ({self.shape[0]},)")
        stored = acts if acts.dtype == storage_dtype(self.dtype) else None
        if not (all_finite(stored, self.dtype) if stored is not None else np.isfinite(acts).all()):
            raise FormatError(f"{self.path.name}: sample {self.samples} (doc {doc}, start {start}) has NaN/Inf activations")
        if stored is None:
            stored = to_storage(acts, self.dtype)
        self.stats.update(from_storage(stored, self.dtype))
        key = f"{self.samples:08d}"
        self._add(f"{key}.acts.npy", npy_bytes(stored))
        self._add(f"{key}.tokens.npy", npy_bytes(tokens.astype(np.int32)))
        self._add(f"{key}.json", json.dumps({"doc": doc, "start": int(start)}).encode())
        self.samples += 1

    def close(self) -> tuple[ShardEntry, RunningStats]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        entry = ShardEntry(file=self.path.name, samples=self.samples,
                           tokens=self.samples * self.shape[0], sha256=self._sha256.hexdigest())
        return entry, self.stats

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class DatasetWriter:
    """Writes a whole dataset folder: rolls shards every ``samples_per_shard`` and writes the manifest.

    Usage::

        with DatasetWriter(folder, model=..., hook_point=..., snapshots=[Snapshot("step0", 0), ...],
                           d_model=64, tokens_per_sample=128) as w:
            w.write(acts, tokens, doc=3, start=0)
    """

    def __init__(self, folder: str | os.PathLike, *, model: str, hook_point: str, snapshots: list[Snapshot],
                 d_model: int, tokens_per_sample: int, dtype: str = "float16", samples_per_shard: int = 256,
                 extra: dict[str, Any] | None = None, split: dict[str, Any] | None = None):
        """``split`` ({"val_shards": N, "rule": ...}): the caller wrote the last N shards from data kept apart
        from the rest (e.g. held-out documents); recorded in the manifest with ``train_stats`` over the others."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta = dict(model=model, hook_point=hook_point, snapshots=list(snapshots), d_model=d_model,
                         dtype=dtype, tokens_per_sample=tokens_per_sample, extra=dict(extra or {}))
        self.samples_per_shard = samples_per_shard
        self.split = dict(split) if split is not None else None
        self.entries: list[ShardEntry] = []
        self.stats = RunningStats(len(snapshots), d_model)
        self.shard_stats: list[RunningStats] = []
        self._shard: ShardWriter | None = None

    def write(self, acts: np.ndarray, tokens: np.ndarray, doc: int | str, start: int) -> None:
        if self._shard is None:
            self._shard = ShardWriter(self.folder / SHARD_NAME.format(len(self.entries)),
                                      len(self.meta["snapshots"]), self.meta["d_model"],
                                      self.meta["tokens_per_sample"], self.meta["dtype"])
        self._shard.write(acts, tokens, doc, start)
        if self._shard.samples >= self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        entry, stats = self._shard.close()
        self.entries.append(entry)
        self.stats.merge(stats)
        self.shard_stats.append(stats)
        self._shard = None

    def close(self) -> Manifest:
        if self._shard is not None and self._shard.samples:
            self._finish_shard()
        names = [s.name for s in self.meta["snapshots"]]
        train_stats = None
        if self.split is not None:
            n_val = int(self.split["val_shards"])
            if not 1 <= n_val < len(self.entries):
                raise FormatError(f"{self.folder}: split.val_shards={n_val} needs at least {n_val + 1} shards, "
                                  f"{len(self.entries)} were written")
            train_stats = merged_stats(self.shard_stats[:-n_val]).snapshot_stats(names)
        manifest = Manifest(shards=self.entries, stats=self.stats.snapshot_stats(names), split=self.split,
                            train_stats=train_stats, **self.meta)
        write_manifest(self.folder, manifest)
        return manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:
            self._shard.abort()


def from_storage(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The inverse of ``to_storage``, as float32."""
    if dtype == "bfloat16":
        import torch
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float().numpy()
    return stored.astype(np.float32, copy=False)


def all_finite(stored: np.ndarray, dtype: str) -> bool:
    if dtype == "bfloat16":  # exponent bits all ones = Inf or NaN
        return not ((stored & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(stored).all())


def decode_sample(files: dict[str, bytes], manifest: Manifest, where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode and check one sample's files. Returns (acts [T, S, D] as stored, tokens [T], meta)."""
    T, S, D = manifest.tokens_per_sample, len(manifest.snapshots), manifest.d_model
    for name in ("acts.npy", "tokens.npy"):
        if name not in files:
            raise FormatError(f"{where}: sample has no {name} (has {sorted(files)})")
    try:
        acts = np.load(io.BytesIO(files["acts.npy"]), allow_pickle=False)
        tokens = np.load(io.BytesIO(files["tokens.npy"]), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a damaged header
        raise FormatError(f"{where}: unreadable .npy ({e})") from None
    if acts.ndim != 3 or acts.shape[1] != S or acts.shape[0] != T:
        raise FormatError(f"{where}: acts.npy has shape {acts.shape}, manifest says [T={T}, S={S}, D={D}]")
    if acts.shape[2] != D:
        raise FormatError(f"{where}: acts.npy has D={acts.shape[2]}, manifest says {D}")
    if acts.dtype != storage_dtype(manifest.dtype):
        raise FormatError(f"{where}: acts.npy is {acts.dtype}, manifest says {manifest.dtype}")
    if tokens.shape != (T,):
        raise FormatError(f"{where}: tokens.npy has shape {tokens.shape}, manifest says ({T},)")
    if not all_finite(acts, manifest.dtype):
        raise FormatError(f"{where}: acts.npy holds NaN or Inf values")
    meta = json.loads(files["json"]) if "json" in files else {}
    return acts, tokens, meta


def iter_samples(folder: str | os.PathLike, manifest: Manifest | None = None,
                 shards: list[ShardEntry] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Read samples in order (for analysis and tests; training streams through data.datamodule)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for entry in shards if shards is not None else manifest.shards:
        yield from read_shard(folder / entry.file, entry, manifest)


def read_shard(path: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True,
               data: bytes | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """All samples of one shard, checked against its manifest entry (sha256, sample count, shapes)."""
    if data is None:
        if not path.is_file():
            raise FormatError(f"{path}: listed in {MANIFEST_NAME} but missing")
        data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise FormatError(f"{path}: sha256 differs from {MANIFEST_NAME} (corrupt or truncated shard)")
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            group: dict[str, bytes] = {}
            key = None
            for member in tar:
                if not member.isreg():
                    continue
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    yield decode_sample(group, manifest, f"{path}: sample {key}")
                    count += 1
                    group = {}
                key = k
                group[ext] = tar.extractfile(member).read()
            if key is not None:
                yield decode_sample(group, manifest, f"{path}: sample {key}")
                count += 1
    except tarfile.TarError as e:
        raise FormatError(f"{path}: corrupt or truncated tar ({e})") from None
    if count != entry.samples:
        raise FormatError(f"{path}: holds {count} samples, {MANIFEST_NAME} says {entry.samples}")
