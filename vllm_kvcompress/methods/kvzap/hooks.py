"""KVzap's input inside vLLM: each decoder layer's attention input (the hidden states
after the input norm), scored by that layer's predictor as the layer runs.

A forward pre-hook on every ``<prefix>.layers.<i>.self_attn`` module (Llama, Qwen2 and
relatives call it as ``self_attn(positions=..., hidden_states=...)``) runs the predictor
on the whole step's tokens at once (one matmul, or two for the MLP) and leaves the
``[tokens, KV heads]`` scores for the same layer's attention, which runs right after. No
model code is forked; the hooks exist only when method ``kvzap`` is configured.

In the engine (:func:`install_buffered`) the hook is one custom op, ``kvcompress::score_into``
(:mod:`~vllm_kvcompress.methods.buffered_scores`), that writes the scores into a persistent
buffer per layer: a compiled graph keeps the op, and a CUDA graph replays its kernels into
the same buffer, so kvzap needs no eager mode. :func:`install` (``record`` receives the
scores) is for eager use, e.g. :func:`offline_scores` under transformers.
"""

from __future__ import annotations

import re
import time

import torch

from vllm_kvcompress.kernels import ops
from vllm_kvcompress.methods import buffered_scores
from vllm_kvcompress.methods.base import PREDICTOR_RANGE
from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor

_ATTENTION = re.compile(r"(^|\.)layers\.(\d+)\.self_attn$")


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]


def _predict(predictor: torch.nn.Module, hidden: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    """Scores ``[tokens, KV heads]`` of this rank's ``heads`` (tensor parallelism: the hidden
    states are whole on every rank, the KV heads are not). ``heads``: a device index, since a
    list would be copied from the host at every call, which a CUDA graph capture refuses."""
    with torch.no_grad(), torch.profiler.record_function(PREDICTOR_RANGE):
        scores = predictor(hidden.to(torch.float32))
        return scores if heads is None else scores.index_select(1, heads)


def _score(predictor: torch.nn.Module, layer: int, heads: torch.Tensor | None, record):
    def hook(module, args, kwargs):
        started = time.perf_counter()
        scores = _predict(predictor, _hidden(args, kwargs), heads)
        record(layer, scores, time.perf_counter() - started)

    return hook


def install_buffered(model: torch.nn.Module, predictors: list[torch.nn.Module], max_tokens: int, record,
                     heads: list[int] | None = None) -> tuple[list, list[torch.Tensor], int]:
    """The engine's hooks: each layer's scores of a step land in rows ``0 .. tokens - 1`` of
    that layer's buffer ``[max_tokens, KV heads]`` (fp32, on the predictors' device; a module
    buffer of the attention, so compiled graphs see one fixed tensor), through
    :mod:`~vllm_kvcompress.methods.buffered_scores`. Returns (handles, buffers by layer, install);
    ``record(layer, None, seconds)`` hears the predictor's time."""
    modules = _attention_modules(model, len(predictors))
    indices = [_head_index(heads, predictor) for predictor in predictors]
    outputs = _outputs(predictors[0]) if indices[0] is None else len(indices[0])
    return buffered_scores.install(modules, lambda layer: _scorer(predictors[layer], indices[layer]), outputs,
                                   _device(predictors[0]), _hidden, max_tokens, record)


def _scorer(predictor: torch.nn.Module, heads: torch.Tensor | None):
    """One layer's ``hidden [T, D] -> scores [T, this rank's KV heads]`` for the engine: a linear
    predictor through ``ops.linear_scores`` (one launch on CUDA; the same numbers as the module
    on the CPU), an MLP through its module."""
    if not isinstance(predictor, LinearPredictor):
        return lambda hidden: _predict(predictor, hidden, heads)
    weight, bias = predictor.proj.weight.detach(), predictor.proj.bias.detach()

    def score(hidden: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(PREDICTOR_RANGE):
            scores = ops.linear_scores(hidden, weight, bias)
            # this rank's heads from the output, as _predict does (fewer rows round differently)
            return scores if heads is None else scores.index_select(1, heads)

    return score


def install(model: torch.nn.Module, predictors: list[torch.nn.Module], record, heads: list[int] | None = None) -> list:
    """Hook every decoder layer's attention (all must be found); returns the hook handles.
    ``record(layer, scores [tokens, KV heads], seconds)`` receives each layer's scores;
    ``heads``: the KV heads this rank holds (tensor parallelism), None = all."""
    modules = _attention_modules(model, len(predictors))
    return [module.register_forward_pre_hook(_score(predictors[layer], layer, _head_index(heads, predictors[layer]),
                                                    record), with_kwargs=True)
            for layer, module in sorted(modules.items())]


def _attention_modules(model: torch.nn.Module, num_layers: int) -> dict[int, torch.nn.Module]:
    """Every decoder layer's attention module, by layer (all must be found)."""
    return buffered_scores.layer_modules(
        model, _ATTENTION, num_layers, "kvzap", "the model's decoder layers must be `...layers.<i>.self_attn` modules "
        "called with `hidden_states` (Llama/Qwen2 style)")


def _outputs(predictor: torch.nn.Module) -> int:
    return [m.out_features for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]


def _device(predictor: torch.nn.Module) -> torch.device:
    return next(predictor.parameters()).device


def _head_index(heads: list[int] | None, predictor: torch.nn.Module) -> torch.Tensor | None:
    return buffered_scores.head_index(heads, _outputs(predictor), _device(predictor))


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
