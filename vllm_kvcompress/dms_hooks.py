"""DMS decisions inside vLLM: each decoder layer's adapter reads the residual stream as
it enters the layer (before the input norm) and scores the step's tokens.

A forward pre-hook on every ``<prefix>.layers.<i>`` decoder layer (vLLM's Llama/Qwen2
layers are called as ``layer(positions, hidden_states, residual)``; the stream is
``hidden_states + residual``, or ``hidden_states`` at the first layer) leaves
``-z`` per ``[token, KV head]`` in :data:`vllm_kvcompress.step_plan.token_scores`: a keep
score, so "kept iff score >= 0" is DMS's "evicted iff z > 0". Which *row* each score
belongs to (the previous token's: shift by one) is the attention glue's business.
Python hooks do not run inside a compiled graph, so DMS needs eager mode.
"""

from __future__ import annotations

import re
import time

import torch

from vllm_kvcompress import step_plan
from vllm_kvcompress.eviction.dms_checkpoint import DMSDecisions

_DECODER_LAYER = re.compile(r"(^|\.)layers\.(\d+)$")


def residual_stream(args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("positions", "hidden_states", "residual")
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    hidden, residual = values["hidden_states"], values.get("residual")
    return hidden if residual is None else hidden + residual


def keep_scores(decisions: DMSDecisions, layer: int, stream: torch.Tensor) -> torch.Tensor:
    """``-z`` ``[T, KV heads]`` (fp32) of one layer's residual stream ``[T, hidden]``."""
    z = decisions.adapters[layer](stream.to(torch.float32))
    if decisions.per_layer:
        z = z[:, :1].expand_as(z)
    return -z


def _hook(decisions: DMSDecisions, layer: int):
    def hook(module, args, kwargs):
        started = time.perf_counter()
        with torch.no_grad():
            step_plan.token_scores[layer] = keep_scores(decisions, layer, residual_stream(args, kwargs))
        step_plan.predictor_seconds += time.perf_counter() - started

    return hook


def install(model: torch.nn.Module, decisions: DMSDecisions) -> list:
    """Hook every decoder layer (all must be found); returns the hook handles."""
    layers = len(decisions.adapters)
    hooked, handles = set(), []
    for name, module in model.named_modules():
        match = _DECODER_LAYER.search(name)
        if match is None or not isinstance(module, torch.nn.Module) or not hasattr(module, "self_attn"):
            continue
        layer = int(match.group(2))
        if layer >= layers:
            raise NotImplementedError(f"dms: model has decoder layer {name} past the checkpoint's {layers} layers")
        handles.append(module.register_forward_pre_hook(_hook(decisions, layer), with_kwargs=True))
        hooked.add(layer)
    if hooked != set(range(layers)):
        raise NotImplementedError(
            f"dms: found decoder layers {sorted(hooked)} of {layers}; the model's decoder layers must be "
            "`...layers.<i>` modules with a `self_attn`, called as layer(positions, hidden_states, residual)")
    return handles
