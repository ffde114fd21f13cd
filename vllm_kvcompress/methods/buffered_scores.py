"""Learned scores that survive compilation: a forward pre-hook whose only work is one
custom op, ``kvcompress::score_into``, that scores a step's tokens into a persistent
buffer per layer (a module buffer of the hooked module).

vLLM compiles the model (Dynamo, then Inductor) and replays CUDA graphs of its pieces. A
Python hook that hands its scores to Python state runs once, while Dynamo traces, and never
again. Dynamo does trace a hook into a call of an opaque op, though, and keeps it; the op's
kernels write into the same buffer at every replay, and the attention (a splitting op, run
between the pieces) reads that buffer. KVzap (its predictor on the attention input) and DMS
(its adapters on the residual stream) both score this way in the engine.

The op takes only tensors and the layer number: what it scores with is looked up by
(install, layer), where the install is the one :func:`activate` names (each engine's runner
activates its own before a step; two engines may share a process). The install's number is
not an argument of the op, so a compiled graph that vLLM saved in another process (where the
number differed) finds the right scorer too.
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Callable

import torch

# (install, layer) -> (score: input [T, ...] -> [T, outputs] fp32, record)
_INSTALLED: dict[tuple[int, int], tuple[Callable, Callable]] = {}
_INSTALLS = itertools.count()
_ACTIVE: list[int | None] = [None]  # the install whose engine runs the model now
BUFFER = "kvc_scores"  # the buffer's name on each hooked module


def activate(number: int) -> None:
    """The install whose scorers the op uses from now on (its engine's step runs next)."""
    _ACTIVE[0] = number


@torch.library.custom_op("kvcompress::score_into", mutates_args=("out",))
def _score_into(tokens: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    score, record = _INSTALLED[(_ACTIVE[0], layer)]
    if tokens.shape[0] > out.shape[0]:
        raise RuntimeError(f"kvcompress: a step of {tokens.shape[0]} tokens, scores buffered for {out.shape[0]}")
    started = time.perf_counter()
    with torch.no_grad():
        out[: tokens.shape[0]].copy_(score(tokens))
    record(layer, None, time.perf_counter() - started)  # wall time where it runs eagerly; 0 in a graph replay


@_score_into.register_fake
def _(tokens: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    return None


def layer_modules(model: torch.nn.Module, pattern: re.Pattern, num_layers: int, what: str, requirement: str,
                  accept=lambda module: True) -> dict[int, torch.nn.Module]:
    """The modules a learned method hooks, by layer: those whose name matches ``pattern``
    (group 2: the layer) and ``accept``; every layer must have one. ``what``, ``requirement``:
    the method and what the model must look like, for the errors."""
    found = {}
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match is None or not accept(module):
            continue
        layer = int(match.group(2))
        if layer >= num_layers:
            raise NotImplementedError(f"{what}: model has module {name} past the {num_layers} layers of its artefact")
        found[layer] = module
    if set(found) != set(range(num_layers)):
        raise NotImplementedError(f"{what}: found modules for layers {sorted(found)} of {num_layers}; {requirement}")
    return found


def head_index(heads: list[int] | None, outputs: int, device: torch.device) -> torch.Tensor | None:
    """Tensor parallelism: this rank's KV heads among a scorer's ``outputs`` as an index on
    ``device`` (a host list would be copied at every call, which a CUDA graph capture
    refuses); None where they are all of them."""
    if heads is None or list(heads) == list(range(outputs)):
        return None
    return torch.tensor(heads, dtype=torch.long, device=device)


def install(modules: dict[int, torch.nn.Module], score_of: Callable[[int], Callable], outputs: int,
            device: torch.device, tokens_of: Callable, max_tokens: int, record) -> tuple[list, list[torch.Tensor], int]:
    """Hook ``modules`` (by layer, every layer present): before each runs, ``tokens_of(args,
    kwargs)`` (traced with the model) goes through ``score_of(layer)`` into rows ``0 .. T - 1``
    of that layer's buffer ``[max_tokens, outputs]`` (fp32, on ``device``). ``record(layer,
    None, seconds)`` hears the scoring time. Returns (handles, buffers by layer, the install's
    number), the install active (:func:`activate`)."""
    number = next(_INSTALLS)
    activate(number)

    def hook_of(layer: int):
        def hook(module, args, kwargs):
            torch.ops.kvcompress.score_into(tokens_of(args, kwargs), getattr(module, BUFFER), layer)

        return hook

    handles, buffers = [], []
    for layer in range(len(modules)):
        module = modules[layer]
        module.register_buffer(BUFFER, torch.zeros(max_tokens, outputs, device=device), persistent=False)
        buffers.append(getattr(module, BUFFER))
        _INSTALLED[(number, layer)] = (score_of(layer), record)
        handles.append(module.register_forward_pre_hook(hook_of(layer), with_kwargs=True))
    return handles, buffers, number
