"""Hydra callback: after a multirun, one table of every job's final metrics (sweep_summary.csv / .json)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from data.format import write_atomic

COLUMNS = ["job", "d_sae", "l1_coef", "activation", "val/l0", "val/explained_variance", "val/dead_fraction"]


def summarise_sweep(sweep_dir: str | Path) -> list[dict]:
    """Collect every run's metrics.json below ``sweep_dir`` (a job, or a dictionary inside a job that trained
    several) into rows; writes sweep_summary.csv and sweep_summary.json."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sorted(sweep_dir.glob("**/metrics.json"), key=lambda p: _job_order(p.parent.relative_to(sweep_dir))):
        metrics = json.loads(path.read_text())
        rows.append({"job": str(path.parent.relative_to(sweep_dir)), **metrics})
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and k.startswith("val/")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / "sweep_summary.csv", buf.getvalue())
    write_atomic(sweep_dir / "sweep_summary.json", json.dumps(rows, indent=1))
    return rows


def _job_order(job: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in job.parts)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = summarise_sweep(config.hydra.sweep.dir)
        print(f"sweep summary of {len(rows)} runs: {Path(config.hydra.sweep.dir) / 'sweep_summary.csv'}")
        for r in rows:
            print("  " + "  ".join(f"{c}={r.get(c)}" for c in COLUMNS))
