"""Train a crosscoder on multi-snapshot activations, cached or computed live.

    python train.py                                   # offline default: mini-Pythia suite, cached, trained
    python train.py data.path=<dataset folder>        # any folder in the shard format (docs/FORMAT.md)
    python train.py data=live                         # snapshots run during training: no activation cache
    python train.py -m crosscoder.d_sae=512,1024 crosscoder.l1_coef=1,2   # sweep, with a summary table

This file only composes: everything it builds comes from conf/ through ``_target_``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from cli import check_config, one_line_errors, quiet_library_noise, run_summary  # noqa: E402
from data.run_folder import LAST_CHECKPOINT, write_config  # noqa: E402


def dataset_path(cfg: DictConfig) -> str:
    """The activation dataset: ``data.path`` if given, else the cache of ``model`` on ``corpus``."""
    if cfg.data.path is not None:
        return str(cfg.data.path)
    if "model" not in cfg or "cache" not in cfg:
        raise ValueError("data.path is null and no model/cache config is selected: set data.path=<dataset folder>")
    from data.cache import ensure_cached
    return str(ensure_cached(cfg.model, cfg.cache, instantiate(cfg.corpus), cfg.paths.cache_dir))


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=true`` continues from this run folder's last checkpoint when there is one."""
    last = run_dir / LAST_CHECKPOINT
    if cfg.resume and last.is_file():
        return str(last)
    return cfg.ckpt_path


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)  # a wrong type names its key before any work
    L.seed_everything(cfg.seed, workers=True)
    clock = time.perf_counter()
    stages = {}
    if "path" in cfg.data:  # cached activations (data=shards); data=live computes them as it trains
        built = cfg.data.path is None  # the cache of model on corpus (built, or found, here)
        with open_dict(cfg):
            cfg.data.path = dataset_path(cfg)
        if built:
            stages["suite and activation cache"] = time.perf_counter() - clock
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    stages["data setup"] = time.perf_counter() - clock - sum(stages.values())
    if getattr(datamodule, "repo", None) and "model" in cfg and not cfg.model.get("repo"):
        with open_dict(cfg):  # a live run records the suite it built, for analysis (as a cache's manifest does)
            cfg.model.repo = datamodule.repo
    write_config(run_dir, cfg)
    module = instantiate(cfg.crosscoder, n_snapshots=datamodule.n_snapshots, d_model=datamodule.d_model,
                         snapshot_names=datamodule.snapshot_names, norm_scale=datamodule.norm_scale(),
                         data_mean=datamodule.raw_mean())
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint_to_resume(cfg, run_dir))
    if module.last_validated_step != trainer.global_step:  # metrics.json must describe the final weights
        trainer.validate(module, datamodule=datamodule, verbose=False)
    stages["training"] = time.perf_counter() - clock - sum(stages.values())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        print(run_summary(metrics, list(datamodule.snapshot_names), stages, run_dir))
    return metrics


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    quiet_library_noise()
    with one_line_errors():
        metrics = train(cfg)
    # Returned for Hydra sweepers that optimise a value (e.g. Optuna): higher is better.
    return metrics.get("val/explained_variance")


if __name__ == "__main__":
    main()
