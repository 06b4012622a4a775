"""The run folder's layout: the one place its file names, sub-runs and sweep rows are defined.

    <run>/config.yaml              the resolved config, written by train.py before training (so a run that dies
                                   still says what it was): data.path, data.val_shards, model.repo, crosscoder.*
    <run>/crosscoder.safetensors   weights + per-snapshot ``scale`` (crosscoder/model.py writes and reads it)
    <run>/metrics.json             final validation metrics ("val/explained_variance/<snapshot>", ...) and the run's
                                   d_sae, l1_coef, activation, snapshots, steps, tokens (callbacks/export.py)
    <run>/tensorboard/             event files
    <run>/checkpoints/last.ckpt    the last Lightning checkpoint (resume=true)
    <run>/<l1_x-Fy>/               with K dictionaries on one stream (several l1_coef / d_sae values): one complete
                                   run folder per dictionary, its config.yaml holding its own d_sae and l1_coef

A sweep (Hydra multirun) folder holds one run folder per job (``0/``, ``1/``, ...) and, written when it ends,
``sweep_summary.csv`` / ``sweep_summary.json``: one row per run folder below it, in job order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.format import write_atomic

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
WEIGHTS_NAME = "crosscoder.safetensors"
TENSORBOARD_DIR = "tensorboard"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # conf/callbacks/default.yaml: dirpath ${run_dir}/checkpoints
SWEEP_SUMMARY_CSV = "sweep_summary.csv"
SWEEP_SUMMARY_JSON = "sweep_summary.json"

# A sweep row's columns after "job": {column: its key in metrics.json}. sweep_summary.csv heads them by key,
# analysis (analysis/sweep.py, the sweep report) by column.
SWEEP_COLUMNS = {"d_sae": "d_sae", "l1_coef": "l1_coef", "activation": "activation", "l0": "val/l0",
                 "explained_variance": "val/explained_variance", "dead_fraction": "val/dead_fraction"}


# ---- sub-runs: K dictionaries trained on one stream -----------------------------------------------------------
def dictionary_name(l1_coef: float, d_sae: int) -> str:
    """The sub-folder (and TensorBoard tag prefix) of one of several dictionaries: ``l1_2-F1024``."""
    return f"l1_{l1_coef:g}-F{d_sae}"


def dictionary_dir(run_dir: str | os.PathLike, name: str) -> Path:
    """A dictionary's run folder: the run folder itself for a lone dictionary (name ""), else its sub-folder."""
    return Path(run_dir) / name if name else Path(run_dir)


def sub_runs(run_dir: str | os.PathLike) -> list[str]:
    """Names of the dictionaries' sub-folders of a run that trained several (empty for a one-dictionary run)."""
    return sorted({p.parent.name for name in (WEIGHTS_NAME, METRICS_NAME) for p in Path(run_dir).glob(f"*/{name}")})


def write_sub_run_config(run_dir: str | os.PathLike, name: str, **crosscoder: Any) -> None:
    """A dictionary's own config.yaml: the run's, with its crosscoder values (d_sae, l1_coef) and run_dir."""
    import yaml
    run_config = Path(run_dir) / CONFIG_NAME
    if not name or not run_config.is_file():
        return
    config = yaml.safe_load(run_config.read_text())
    config["crosscoder"].update(crosscoder)
    config["run_dir"] = str(dictionary_dir(run_dir, name))
    write_atomic(dictionary_dir(run_dir, name) / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))


def check_run_folder(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path; FileNotFoundError naming it when it is missing, or when it holds the sub-runs of
    several dictionaries instead of one (the error names them and how to read them)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not (run_dir / WEIGHTS_NAME).is_file() and (inner := sub_runs(run_dir)):
        raise FileNotFoundError(f"{run_dir}: holds {len(inner)} dictionaries ({', '.join(inner)}): analyse one "
                                f"with run={run_dir}/<name>, or compare them with sweep={run_dir}")
    return run_dir


# ---- config.yaml and metrics.json -------------------------------------------------------------------------------
def write_config(run_dir: str | os.PathLike, cfg) -> None:
    """The resolved config (an OmegaConf DictConfig) as config.yaml."""
    from omegaconf import OmegaConf
    write_atomic(Path(run_dir) / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: str | os.PathLike):
    """config.yaml as a DictConfig; empty when the run has none."""
    from omegaconf import OmegaConf
    path = Path(run_dir) / CONFIG_NAME
    return OmegaConf.load(path) if path.is_file() else OmegaConf.create({})


def write_metrics(run_dir: str | os.PathLike, metrics: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / METRICS_NAME, json.dumps(metrics, indent=1))


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """metrics.json; empty when the run has none (it died before the end, or is still training)."""
    path = Path(run_dir) / METRICS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def has_metrics(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / METRICS_NAME).is_file()


# ---- sweeps -------------------------------------------------------------------------------------------------------
def job_order(job: str | os.PathLike) -> tuple:
    """Sort key of a job's path below its sweep folder: numeric parts in numeric order (2 before 10), named ones
    after (a job's dictionaries ``0/l1_1-F64`` after ``0`` itself)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in Path(job).parts)


def finished_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Every run folder below ``sweep_dir`` holding metrics.json (jobs, and the dictionaries of a job that trained
    several), in job order."""
    sweep_dir = Path(sweep_dir)
    return sorted((p.parent for p in sweep_dir.glob(f"**/{METRICS_NAME}")), key=lambda p: job_order(p.relative_to(sweep_dir)))


def is_sweep_folder(path: str | os.PathLike) -> bool:
    """A finished sweep: its summary has been written."""
    return (Path(path) / SWEEP_SUMMARY_CSV).is_file()
