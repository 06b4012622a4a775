"""Hydra callback: after a multirun, one table of every job's final metrics (sweep_summary.csv / .json)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from data.format import write_atomic
from data.run_folder import SWEEP_COLUMNS, SWEEP_SUMMARY_CSV, SWEEP_SUMMARY_JSON, finished_runs, read_metrics

COLUMNS = ["job", *SWEEP_COLUMNS.values()]  # headed by their metrics.json keys


def summarise_sweep(sweep_dir: str | Path) -> list[dict]:
    """Collect every run's metrics.json below ``sweep_dir`` (a job, or a dictionary inside a job that trained
    several) into rows; writes sweep_summary.csv and sweep_summary.json."""
    sweep_dir = Path(sweep_dir)
    rows = [{"job": str(run.relative_to(sweep_dir)), **read_metrics(run)} for run in finished_runs(sweep_dir)]
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and k.startswith("val/")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / SWEEP_SUMMARY_CSV, buf.getvalue())
    write_atomic(sweep_dir / SWEEP_SUMMARY_JSON, json.dumps(rows, indent=1))
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = summarise_sweep(config.hydra.sweep.dir)
        print(f"sweep summary of {len(rows)} runs: {Path(config.hydra.sweep.dir) / SWEEP_SUMMARY_CSV}")
        for r in rows:
            print("  " + "  ".join(f"{c}={r.get(c)}" for c in COLUMNS))
