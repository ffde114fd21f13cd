"""KVzap's input inside vLLM: each decoder layer's attention input (the hidden states
after the input norm), scored by that layer's predictor as the layer runs.

A forward pre-hook on every ``<prefix>.layers.<i>.self_attn`` module (Llama, Qwen2 and
relatives call it as ``self_attn(positions=..., hidden_states=...)``) runs the predictor
on the whole step's tokens at once (one matmul, or two for the MLP) and leaves the
``[tokens, KV heads]`` scores for the same layer's attention, which runs right after. No
model code is forked; the hooks exist only when method ``kvzap`` is configured.

In the engine (:func:`install_buffered`) the hook is one custom op, ``kvcompress::kvzap_score``,
that writes the scores into a persistent buffer per layer: a compiled graph keeps the op
(Dynamo traces the hook, not the predictor inside it), and a CUDA graph replays its kernels
into the same buffer, so kvzap needs no eager mode. :func:`install` (``record`` receives the
scores) is for eager use, e.g. :func:`offline_scores` under transformers.
"""

from __future__ import annotations

import itertools
import re
import time

import torch

from vllm_kvcompress.methods.base import PREDICTOR_RANGE

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


# What the op scores with, by (install, layer): each install (one per engine; two engines may
# share a process) gets its own number, which its hooks pass to the op with the layer. The op
# itself takes only tensors and integers, which Dynamo and CUDA graphs keep as they are.
_INSTALLED: dict[tuple[int, int], tuple[torch.nn.Module, torch.Tensor | None, object]] = {}
_INSTALLS = itertools.count()


@torch.library.custom_op("kvcompress::kvzap_score", mutates_args=("out",))
def _score_into(hidden: torch.Tensor, out: torch.Tensor, install: int, layer: int) -> None:
    predictor, heads, record = _INSTALLED[(install, layer)]
    if hidden.shape[0] > out.shape[0]:
        raise RuntimeError(f"kvzap: a step of {hidden.shape[0]} tokens, scores buffered for {out.shape[0]}")
    started = time.perf_counter()
    out[: hidden.shape[0]].copy_(_predict(predictor, hidden, heads))
    record(layer, None, time.perf_counter() - started)  # wall time where it runs eagerly; 0 in a graph replay


@_score_into.register_fake
def _(hidden: torch.Tensor, out: torch.Tensor, install: int, layer: int) -> None:
    return None


def install_buffered(model: torch.nn.Module, predictors: list[torch.nn.Module], max_tokens: int, record,
                     heads: list[int] | None = None) -> tuple[list, list[torch.Tensor]]:
    """The engine's hooks: each layer's scores of a step land in rows ``0 .. tokens - 1`` of
    that layer's buffer ``[max_tokens, KV heads]`` (fp32, on the predictors' device; a module
    buffer of the attention, so compiled graphs see one fixed tensor). Returns (handles, buffers
    by layer); ``record(layer, None, seconds)`` hears the predictor's time."""
    buffers: dict[int, torch.Tensor] = {}
    install = next(_INSTALLS)

    def hook_of(layer: int):
        def hook(module, args, kwargs):
            torch.ops.kvcompress.kvzap_score(_hidden(args, kwargs), module.kvc_kvzap_scores, install, layer)

        return hook

    def attach(name: str, module: torch.nn.Module, layer: int):
        predictor = predictors[layer]
        index = _head_index(heads, predictor)
        outputs = _outputs(predictor) if index is None else len(index)
        module.register_buffer("kvc_kvzap_scores", torch.zeros(max_tokens, outputs, device=_device(predictor)),
                               persistent=False)
        buffers[layer] = module.kvc_kvzap_scores
        _INSTALLED[(install, layer)] = (predictor, index, record)
        return module.register_forward_pre_hook(hook_of(layer), with_kwargs=True)

    handles = _hook_layers(model, len(predictors), attach)
    return handles, [buffers[layer] for layer in range(len(predictors))]


def install(model: torch.nn.Module, predictors: list[torch.nn.Module], record, heads: list[int] | None = None) -> list:
    """Hook every decoder layer's attention (all must be found); returns the hook handles.
    ``record(layer, scores [tokens, KV heads], seconds)`` receives each layer's scores;
    ``heads``: the KV heads this rank holds (tensor parallelism), None = all."""
    return _hook_layers(model, len(predictors), lambda name, module, layer: module.register_forward_pre_hook(
        _score(predictors[layer], layer, _head_index(heads, predictors[layer]), record), with_kwargs=True))


def _hook_layers(model: torch.nn.Module, num_layers: int, attach) -> list:
    """``attach(name, module, layer)`` on every decoder layer's attention (all must be found)."""
    hooked, handles = set(), []
    for name, module in model.named_modules():
        match = _ATTENTION.search(name)
        if match is None:
            continue
        layer = int(match.group(2))
        if layer >= num_layers:
            raise NotImplementedError(f"kvzap: model has attention module {name} past the predictors' "
                                      f"{num_layers} layers")
        handles.append(attach(name, module, layer))
        hooked.add(layer)
    if hooked != set(range(num_layers)):
        raise NotImplementedError(
            f"kvzap: found attention inputs for layers {sorted(hooked)} of {num_layers}; the model's decoder "
            "layers must be `...layers.<i>.self_attn` modules called with `hidden_states` (Llama/Qwen2 style)")
    return handles


def _outputs(predictor: torch.nn.Module) -> int:
    return [m.out_features for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]


def _device(predictor: torch.nn.Module) -> torch.device:
    return next(predictor.parameters()).device


def _head_index(heads: list[int] | None, predictor: torch.nn.Module) -> torch.Tensor | None:
    """``heads`` as an index on the predictor's device; None where they are all its outputs."""
    if heads is None or heads == list(range(_outputs(predictor))):
        return None
    return torch.tensor(heads, dtype=torch.long, device=_device(predictor))


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
