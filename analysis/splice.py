"""The crosscoder spliced into one snapshot model at its hook point.

Axes: N prompts, T positions, S snapshots, D model width, F latents.

At snapshot s the hook's output h [N, T, D] (raw units) is written as

    h = decode_s(f^s) + e,    decode_s(f) = (f W_dec[:, s] + b_dec[s]) / scale[s],    e = h - decode_s(f^s)

where f^s [N, T, F] is the code that snapshot s's decoder multiplies: the shared code f for every activation
but "paper", whose per-snapshot gates give each snapshot its own code. The code is computed from every
snapshot's activation on the same tokens, since the crosscoder's encoder reads them all. With e held fixed
the forward pass is unchanged, yet every feature is a node that gradients reach and interventions move.

Positions before ``drop_first`` (the start token, which the crosscoder never saw in training) keep the model's
own output and have no features.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from crosscoder.model import Crosscoder
from data.snapshots import activations, hook_module


@torch.no_grad()
def hook_activations(model, ids: torch.Tensor, layer: int, hook: str, batch_size: int) -> torch.Tensor:
    """[N, T, D] raw activations at the hook (in the model's dtype) for token ids [N, T], on the CPU."""
    return torch.cat([activations(model, ids[i:i + batch_size], layer, hook).cpu()
                      for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def snapshot_code(crosscoder: Crosscoder, acts: torch.Tensor, s: int, batch_size: int = 4096) -> torch.Tensor:
    """acts [N, T, S, D] raw (positions from drop_first on) -> f^s [N, T, F], the code snapshot s decodes
    (the same for every s unless the activation is "paper")."""
    N, T, S, D = acts.shape
    flat = acts.reshape(N * T, S, D) * crosscoder.scale.to(acts.device)[:, None]
    codes = []
    for i in range(0, N * T, batch_size):
        out = crosscoder(flat[i:i + batch_size])
        codes.append(out.snapshot_code(s))
    return torch.cat(codes).reshape(N, T, -1)


def decode_at(crosscoder: Crosscoder, code: torch.Tensor, s: int) -> torch.Tensor:
    """code [..., F] -> decode_s(code) [..., D] in raw units (the hook's own units)."""
    return (code @ crosscoder.W_dec[:, s] + crosscoder.b_dec[s]) / crosscoder.scale[s]


@contextmanager
def replaced_output(model, layer: int, hook: str, drop_first: int,
                    replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the hook's output h [n, T, D] becomes h[:, :drop_first] joined to replace(h)[:, drop_first:]
    (replace gets and returns the positions from drop_first on)."""
    def hook_fn(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = replace(h[:, drop_first:])
        new = torch.cat([h[:, :drop_first], new.to(h.dtype)], dim=1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = hook_module(model, layer, hook).register_forward_hook(hook_fn)
    try:
        yield
    finally:
        handle.remove()


def logits_with(model, ids: torch.Tensor, layer: int, hook: str, drop_first: int,
                value: torch.Tensor | None) -> torch.Tensor:
    """Logits [n, T, V] of token ids [n, T] with the hook's output from drop_first on set to value [n, T', D]
    (None: the model's own forward pass). Gradients flow to value."""
    device = next(model.parameters()).device
    if value is None:
        return model(input_ids=ids.to(device), use_cache=False).logits
    with replaced_output(model, layer, hook, drop_first, lambda _h: value.to(device)):
        return model(input_ids=ids.to(device), use_cache=False).logits
