"""Model snapshots: Pythia's checkpoint schedule, loading a revision, and reading one hook point.

A snapshot is ``(repo, revision)``: a Hugging Face repo id loaded with ``from_pretrained(repo,
revision="step1000")``, or a local folder holding one sub-folder per revision (``<repo>/step1000/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HOOKS = ("resid_post", "mlp_out", "attn_out")


def pythia_steps() -> list[int]:
    """Pythia's 154 public checkpoints: step 0, 1, 2, 4, ..., 512, then every 1000 steps to 143000."""
    return [0] + [2 ** i for i in range(10)] + list(range(1000, 143_001, 1000))


PYTHIA_REVISIONS_FILE = Path(__file__).resolve().parents[1] / "conf" / "model" / "_pythia_revisions.yaml"


def paper_steps() -> tuple[int, ...]:
    """The paper's 32 Pythia steps, read from their one home: ``paper_revisions`` in
    conf/model/_pythia_revisions.yaml (the paper presets use the same list)."""
    from omegaconf import OmegaConf
    return tuple(int(str(r).removeprefix("step")) for r in OmegaConf.load(PYTHIA_REVISIONS_FILE).paper_revisions)


def log_spaced_revisions(n: int, steps: list[int] | None = None) -> list[str]:
    """n revisions spread evenly in log(step + 1) over the schedule, always with the first and last."""
    steps = steps or pythia_steps()
    if n >= len(steps):
        return [f"step{s}" for s in steps]
    logs = np.log(np.asarray(steps) + 1)
    # early checkpoints are denser than an even log grid, so several targets can land on one step:
    # widen the grid until it yields n distinct steps
    for m in range(n, 10 * n):
        picked = sorted({steps[int(np.abs(logs - t).argmin())] for t in np.linspace(0, logs[-1], m)})
        if len(picked) >= n:
            return [f"step{s}" for s in picked]
    return [f"step{s}" for s in steps]


def revision_step(revision: str) -> int:
    if not revision.startswith("step") or not revision[4:].isdigit():
        raise ValueError(f"model.revisions: '{revision}' is not a revision name of the form stepN")
    return int(revision[4:])


def is_local(repo: str) -> bool:
    return Path(repo).expanduser().is_dir()


def check_revisions(repo: str, revisions: list[str]) -> None:
    """Fail before any work if a revision cannot exist: a missing local sub-folder, or for Pythia on the
    hub, a step that is not one of its public checkpoints."""
    if not revisions:
        raise ValueError("model.revisions is empty")
    for r in revisions:
        revision_step(r)
    if len(set(revisions)) != len(revisions):
        raise ValueError(f"model.revisions names a revision twice: {revisions}")
    if is_local(repo):
        root = Path(repo).expanduser()
        missing = [r for r in revisions if not (root / r / "config.json").is_file()]
        if missing:
            have = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
            raise FileNotFoundError(f"{root}: no model folder for revision(s) {missing} (found: {have})")
    elif "pythia" in repo.lower():
        public = set(pythia_steps())
        unknown = [r for r in revisions if revision_step(r) not in public]
        if unknown:
            raise ValueError(f"model.revisions: {unknown} are not public checkpoints of {repo} "
                             "(step0, 1, 2, 4, ..., 512, then every 1000 steps to step143000)")


class HubUnreachable(OSError):
    """A snapshot of a hub repo that could not be loaded (no network, no cached copy, or no such revision)."""


def _from_hub(load, repo: str, revision: str, **kwargs):
    try:
        return load(repo, revision=revision, **kwargs)
    except OSError as err:  # transformers reports a missing network, cache entry or revision as OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubUnreachable(
            f"model.repo={repo} revision={revision}: could not be loaded from the Hugging Face hub ({reason}). Run once "
            "with network access (and HF_HUB_OFFLINE unset) to fill the hub cache, or set model.repo to a local folder "
            "with one sub-folder per revision (<repo>/stepN/)") from err


def load_snapshot(repo: str, revision: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The causal LM at one revision, in eval mode."""
    from transformers import AutoModelForCausalLM
    if is_local(repo):
        model = AutoModelForCausalLM.from_pretrained(Path(repo).expanduser() / revision, dtype=dtype)
    else:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, repo, revision, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(repo: str, revision: str):
    from transformers import AutoTokenizer
    if is_local(repo):
        return AutoTokenizer.from_pretrained(Path(repo).expanduser() / revision)
    return _from_hub(AutoTokenizer.from_pretrained, repo, revision)


class _Stop(Exception):
    """Raised by the hook to skip the layers above it: caching pays only for the layers it reads."""


def hook_module(model, layer: int, hook: str) -> torch.nn.Module:
    """The module whose output is the hook point (GPT-NeoX layout: model.gpt_neox.layers[L])."""
    if hook not in HOOKS:
        raise ValueError(f"model.hook: '{hook}' is not one of {HOOKS}")
    layers = model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"model.layer: {layer} is out of range (the model has {len(layers)} layers)")
    block = layers[layer]
    return {"resid_post": block, "mlp_out": block.mlp,
            "attn_out": getattr(block, "attention", None) or getattr(block, "self_attn")}[hook]


def hook_point_name(model, layer: int, hook: str) -> str:
    module = hook_module(model, layer, hook)
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def activations(model, input_ids: torch.Tensor, layer: int, hook: str) -> torch.Tensor:
    """[B, T, D] activations at the hook point for a batch of token windows [B, T]."""
    captured = {}

    def grab(_module, _inputs, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = hook_module(model, layer, hook).register_forward_hook(grab)
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["out"]
