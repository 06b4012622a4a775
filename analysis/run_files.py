"""A run folder written by train.py (layout: data/run_folder.py), opened for analysis.

Read from config.yaml: data.path (dataset folder), data.val_shards (null: the dataset's recorded split) and
model.repo (the suite: a local folder or a hub id). Everything but the weights is optional: a run whose
dataset has moved is still analysed from its decoders (no activation pass), and a suite without a tokenizer
shows token ids.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from crosscoder.model import Crosscoder
from data.format import MANIFEST_NAME, FormatError, Manifest, read_manifest, val_shard_count
from data.run_folder import CONFIG_NAME, check_run_folder, read_config, read_metrics

TokenDecoder = Callable[[int], str]


@dataclass
class RunFiles:
    run_dir: Path
    crosscoder: Crosscoder  # the trained dictionary (``model`` elsewhere is the suite's config or an HF model)
    config: DictConfig  # empty when config.yaml is missing
    metrics: dict[str, Any]  # empty when metrics.json is missing
    manifest: Manifest | None  # None when the dataset folder cannot be read
    data_path: Path | None
    steps: list[int]  # [S] training step of each crosscoder snapshot
    val_shards: int  # the last val_shards shards of the dataset are held out

    @property
    def names(self) -> list[str]:
        return self.crosscoder.snapshot_names


def select(config: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(config, key, default=default, throw_on_missing=False)
    return default if value is None else value


def load_run(run_dir: str | Path, device: str = "cpu") -> RunFiles:
    run_dir = check_run_folder(run_dir)
    crosscoder = Crosscoder.load(run_dir, device=device).eval()
    config, metrics = read_config(run_dir), read_metrics(run_dir)
    data_path, manifest = _dataset(run_dir, config)
    return RunFiles(run_dir=run_dir, crosscoder=crosscoder, config=config, metrics=metrics, manifest=manifest,
                    data_path=data_path, steps=snapshot_steps(crosscoder.snapshot_names, manifest),
                    val_shards=_val_shards(config, manifest, data_path))


def _val_shards(config: DictConfig, manifest: Manifest | None, data_path: Path | None) -> int:
    """The held-out shard count training used: the dataset's recorded split, else data.val_shards (default 1)."""
    requested = select(config, "data.val_shards")
    if manifest is None:
        return int(requested) if requested is not None else 1
    try:
        return val_shard_count(manifest, requested, str(data_path / MANIFEST_NAME))
    except FormatError as e:  # a run that trained before the dataset recorded its split: the split wins
        warnings.warn(f"{e}; analysing with the recorded split")
        return manifest.recorded_val_shards


def _dataset(run_dir: Path, config: DictConfig) -> tuple[Path | None, Manifest | None]:
    path = select(config, "data.path")
    if path is None:
        return None, None
    path = Path(path)
    if not path.is_absolute() and not path.is_dir():
        path = run_dir / path
    try:
        return path, read_manifest(path)
    except FormatError as e:
        warnings.warn(f"{run_dir / CONFIG_NAME}: data.path unreadable, analysing decoders only ({e})")
        return None, None


def snapshot_steps(names: list[str], manifest: Manifest | None) -> list[int]:
    """Training step of each snapshot: from the manifest, else parsed from names like 'step1000'."""
    known = {s.name: s.step for s in manifest.snapshots} if manifest is not None else {}
    steps = []
    for i, name in enumerate(names):
        if name in known:
            steps.append(known[name])
        elif m := re.search(r"(\d+)$", name):
            steps.append(int(m.group(1)))
        else:
            steps.append(i)
    return steps


def _suite_dirs(run: RunFiles) -> list[Path]:
    """Folders that may hold the model suite's tokenizer and loss curve."""
    dirs = []
    value = select(run.config, "model.repo")  # conf/model/*.yaml: a local suite folder or a hub id
    if isinstance(value, str) and Path(value).is_dir():
        dirs.append(Path(value))
    if run.manifest is not None:
        for value in (run.manifest.model, *(v for v in run.manifest.extra.values() if isinstance(v, str))):
            if Path(value).is_dir():
                dirs.append(Path(value))
    return list(dict.fromkeys(dirs))


def load_token_decoder(run: RunFiles) -> TokenDecoder | None:
    """id -> text piece with the suite's tokenizer (tokenizer.json in the suite folder or a revision
    sub-folder); None when no tokenizer is found, so callers show ids."""
    from tokenizers import Tokenizer
    for folder in _suite_dirs(run):
        candidates = [folder / "tokenizer.json", *(folder / n / "tokenizer.json" for n in reversed(run.names)),
                      *sorted(folder.glob("*/tokenizer.json"))]
        for path in candidates:
            if path.is_file():
                tok = Tokenizer.from_file(str(path))
                return lambda i, tok=tok: tok.decode([int(i)])
    name = select(run.config, "model.repo") or (run.manifest.model if run.manifest else None)
    if name:
        try:  # a hub model already in the local cache (never downloads)
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
            return lambda i, hf=hf: hf.decode([int(i)])
        except Exception:  # any failure means "no tokenizer here": the browser shows ids instead
            pass
    return None


def find_loss_curve(run: RunFiles) -> tuple[list[int], list[float]] | None:
    """The suite's pre-training loss curve (loss_curve.json beside the revisions), if one is known."""
    for folder in _suite_dirs(run) + ([run.data_path] if run.data_path else []):
        for path in (folder / "loss_curve.json", folder.parent / "loss_curve.json"):
            if path.is_file():
                curve = parse_loss_curve(json.loads(path.read_text()))
                if curve is not None:
                    return curve
    return None


def parse_loss_curve(raw: Any) -> tuple[list[int], list[float]] | None:
    """Accepts {"steps": [...], "loss": [...]} (also "step"/"losses"/"train_loss"), a list of
    {"step", "loss"} records, or {"<step>": loss}; returns (steps, losses) sorted by step."""
    pairs: list[tuple[float, float]] = []
    if isinstance(raw, dict):
        steps = next((raw[k] for k in ("steps", "step") if isinstance(raw.get(k), list)), None)
        losses = next((raw[k] for k in ("loss", "losses", "train_loss", "val_loss") if isinstance(raw.get(k), list)),
                      None)
        if steps is not None and losses is not None:
            pairs = list(zip(steps, losses))
        elif all(re.fullmatch(r"\d+", str(k)) for k in raw) and raw:
            pairs = [(int(k), v) for k, v in raw.items()]
        else:
            for value in raw.values():  # e.g. {"train": {...}} or {"curve": [...]}
                if (curve := parse_loss_curve(value)) is not None:
                    return curve
    elif isinstance(raw, list):
        for rec in raw:
            if isinstance(rec, dict):
                loss = next((rec[k] for k in ("loss", "train_loss", "val_loss") if k in rec), None)
                if "step" in rec and loss is not None:
                    pairs.append((rec["step"], loss))
            elif isinstance(rec, (list, tuple)) and len(rec) == 2:
                pairs.append((rec[0], rec[1]))
    pairs = sorted((int(s), float(v)) for s, v in pairs if isinstance(v, (int, float)))
    if not pairs:
        return None
    return [s for s, _ in pairs], [v for _, v in pairs]
