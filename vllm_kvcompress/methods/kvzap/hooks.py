"""KVzap's input inside vLLM: each decoder layer's attention input (the hidden states
after the input norm), scored by that layer's predictor as the layer runs.

A forward pre-hook on every ``<prefix>.layers.<i>.self_attn`` module (Llama, Qwen2 and
relatives call it as ``self_attn(positions=..., hidden_states=...)``) runs the predictor
on the whole step's tokens at once (one matmul, or two for the MLP) and leaves the
``[tokens, KV heads]`` scores with ``record(layer, scores, seconds)`` for the same
layer's attention, which runs right after (the worker keeps them in its step plan). No model code is forked; the hooks exist
only when method ``kvzap`` is configured. Python hooks cannot run inside a compiled
graph, so kvzap needs eager mode (checked at start-up).
"""

from __future__ import annotations

import re
import time

import torch

from vllm_kvcompress.methods.base import PREDICTOR_RANGE

_ATTENTION = re.compile(r"(^|\.)layers\.(\d+)\.self_attn$")


def _score(predictor: torch.nn.Module, layer: int, heads: list[int] | None, record):
    def hook(module, args, kwargs):
        started = time.perf_counter()
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
        with torch.no_grad(), torch.profiler.record_function(PREDICTOR_RANGE):
            scores = predictor(hidden.to(torch.float32))
            # Tensor parallelism: the hidden states are whole on every rank, the KV heads are not.
            scores = scores if heads is None else scores[:, heads]
        record(layer, scores, time.perf_counter() - started)

    return hook


def install(model: torch.nn.Module, predictors: list[torch.nn.Module], record, heads: list[int] | None = None) -> list:
    """Hook every decoder layer's attention (all must be found); returns the hook handles.
    ``record(layer, scores [tokens, KV heads], seconds)`` receives each layer's scores;
    ``heads``: the KV heads this rank holds (tensor parallelism), None = all."""
    hooked, handles = set(), []
    for name, module in model.named_modules():
        match = _ATTENTION.search(name)
        if match is None:
            continue
        layer = int(match.group(2))
        if layer >= len(predictors):
            raise NotImplementedError(f"kvzap: model has attention module {name} past the predictors' "
                                      f"{len(predictors)} layers")
        handles.append(module.register_forward_pre_hook(_score(predictors[layer], layer, _subset(heads, predictors[layer]), record),
                                                  with_kwargs=True))
        hooked.add(layer)
    if hooked != set(range(len(predictors))):
        raise NotImplementedError(
            f"kvzap: found attention inputs for layers {sorted(hooked)} of {len(predictors)}; the model's decoder "
            "layers must be `...layers.<i>.self_attn` modules called with `hidden_states` (Llama/Qwen2 style)")
    return handles


def _subset(heads: list[int] | None, predictor: torch.nn.Module) -> list[int] | None:
    outputs = [m.out_features for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]
    return None if heads is None or heads == list(range(outputs)) else heads


@torch.no_grad()
def offline_scores(model: torch.nn.Module, predictors: list[torch.nn.Module], ids: list[int]) -> torch.Tensor:
    """Predicted scores ``[layers, tokens, KV heads]`` of a token sequence under a
    transformers model (same hooks, one forward): the reference for the engine's."""
    scores = {}
    handles = install(model, predictors, lambda layer, s, _seconds: scores.__setitem__(layer, s))
    try:
        model(torch.tensor([ids]), use_cache=False)
        return torch.stack([scores[i].reshape(len(ids), -1) for i in range(len(predictors))])
    finally:
        for handle in handles:
            handle.remove()
