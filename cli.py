"""What every command-line entry point (train.py, analyze.py, python -m data.cache) does around its work.

- ``quiet_library_noise()``: drops the library messages a user cannot act on (Lightning's pytree deprecation
  warning, its litlogger advertisement), so that the first lines of a run are the run's own.
- ``check_config(cfg)``: at start-up, every ``_target_`` node of the config (crosscoder, data, trainer, corpus,
  callbacks, loggers, nested ones too) against the type hints of the constructor it names, and the ``model`` and
  ``cache`` groups against their schemas (data/schema.py), so that ``crosscoder.d_sae=abc`` or ``model.layer=x``
  names its key instead of failing deep inside torch.
- ``run_summary()``: the lines a run ends with: what it reached (explained variance and L0 per snapshot, dead
  fraction), how long each stage took, where its files are and the next command.
- ``one_line_errors()``: an error raised by this project's own code (a bad dataset folder, a config value, a
  snapshot that cannot be loaded) prints as ONE line naming the file, key or value, and the command exits with
  status 1; the traceback is kept for ``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full tracebacks). Errors
  raised inside libraries (a bug, or a case the project does not check) keep their traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import sys
import traceback
import types
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from data.run_folder import TENSORBOARD_DIR

ROOT = Path(__file__).resolve().parent
# the kinds of error the project raises for bad input (data/format.py's FormatError is a ValueError)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, OSError, KeyError, FloatingPointError)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_library_noise() -> None:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("litlogger"))


def _raised_by_project(err: BaseException) -> bool:
    """Whether the frame that raised ``err`` is this project's code (not a library's)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    return ROOT in where.parents and not any(part in ("site-packages", ".venv", ".venv-ci") for part in where.parts)


def one_line(err: BaseException) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    return f"error: {message}"


@contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _raised_by_project(err):
            raise
        print(f"{one_line(err)}   (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a simple type hint (int, float, bool, str, None, unions and lists of them);
    True for any hint this check does not model (the constructor checks those itself)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(args) != 1 or all(_matches(v, args[0]) for v in value)
    return True


def _hints(node) -> dict[str, Any]:
    module, _, name = str(node._target_).rpartition(".")
    target = getattr(importlib.import_module(module), name)
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - hints that do not resolve are not checked
        return {}


def check_types(node, key: str, schema: type | None = None) -> None:
    """Each value of the config node ``key`` against the type hints of its ``_target_``'s constructor (or of the
    dataclass ``schema``); nested ``_target_`` nodes are checked too. ValueError naming the first key whose value
    does not fit, or a key the schema requires and the node lacks."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    if not isinstance(node, DictConfig):
        return
    if schema is not None:
        hints = typing.get_type_hints(schema)
        required = [f.name for f in dataclasses.fields(schema)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in node]
        if missing:
            raise ValueError(f"{key}: missing key {missing[0]} (see {schema.__module__}.{schema.__name__})")
    else:
        hints = _hints(node) if "_target_" in node else {}
    for k in node:
        child = node._get_node(k)
        if str(k).startswith("_"):
            continue
        if isinstance(child, (DictConfig, ListConfig)):
            if isinstance(child, DictConfig):
                check_types(child, f"{key}.{k}")
                continue
            for i, item in enumerate(child):  # e.g. trainer.plugins: a list of _target_ nodes
                check_types(item, f"{key}.{k}.{i}")
        if k not in hints:
            continue
        value = node[k]  # resolved: an interpolation may stand for a list
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not _matches(value, hints[k]):
            hint = getattr(hints[k], "__name__", None) or str(hints[k]).replace("typing.", "")
            raise ValueError(f"{key}.{k}: {value!r} is not a valid value (expected {hint})")


def check_config(cfg) -> None:
    """Every top-level group of the composed config (see the module docstring)."""
    from data.schema import SCHEMAS
    for key in cfg:
        check_types(cfg._get_node(key), str(key), SCHEMAS.get(str(key)))


def run_summary(metrics: dict[str, float], snapshot_names: list[str], stages: dict[str, float], run_dir: Path) -> str:
    """The end-of-run summary (``metrics``: the trainer's final callback metrics, plain floats)."""
    lines = ["", "Run finished."]
    ev, l0, dead = (metrics.get(f"val/{k}") for k in ("explained_variance", "l0", "dead_fraction"))
    if ev is not None:
        lines.append(f"  validation: explained variance {ev:.4f}, L0 {l0:.1f}, dead latents {100 * dead:.1f}%"
                     if l0 is not None and dead is not None else f"  validation: explained variance {ev:.4f}")
        per = [(n, metrics.get(f"val/explained_variance/{n}")) for n in snapshot_names]
        if all(v is not None for _, v in per):
            lines.append("  explained variance per snapshot: " + ", ".join(f"{n} {v:.3f}" for n, v in per))
    lines.append("  wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items()))
    lines += [f"  run folder:  {run_dir}", f"  tensorboard: tensorboard --logdir {run_dir / TENSORBOARD_DIR}",
              f"  next:        python analyze.py run={run_dir}"]
    return "\n".join(lines)
