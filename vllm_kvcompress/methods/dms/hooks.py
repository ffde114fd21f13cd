"""DMS decisions inside vLLM: each decoder layer's adapter reads the residual stream as
it enters the layer (before the input norm) and scores the step's tokens.

A forward pre-hook on every ``<prefix>.layers.<i>`` decoder layer (vLLM's Llama/Qwen2
layers are called as ``layer(positions, hidden_states, residual)``; the stream is
``hidden_states + residual``, or ``hidden_states`` at the first layer) leaves
``-z`` per ``[token, KV head]`` with ``record(layer, scores, seconds)``: a keep
score, so "kept iff score >= 0" is DMS's "evicted iff z > 0". Which *row* each score
belongs to (the previous token's: shift by one) is the attention glue's business.

Single-neuron checkpoints decide from the query instead: ``z = scale * q[..., -1] - offset``
on the last channel of the first query head of each GQA group, after any q-norm and
before RoPE, as the official code reads it. A pre-hook on each layer's ``rotary_emb``
call (vLLM shares one rotary module between layers, so a pre-hook on ``self_attn`` names
the layer) reads that channel and zeroes it; the attention impl zeroes it again after
RoPE (the ``adjust_query`` that :func:`install` returns), so it never enters ``q . k``.

Python hooks that hand scores to Python state do not run inside a compiled graph: in the
engine, adapter checkpoints score through the custom op of
:mod:`~vllm_kvcompress.methods.buffered_scores` into persistent buffers
(:func:`install_buffered`), which compiled graphs and CUDA graphs keep. Single-neuron
checkpoints change the query inside the attention, so they need eager mode.
"""

from __future__ import annotations

import re
import time

import torch

from vllm_kvcompress.kernels import ops
from vllm_kvcompress.methods import buffered_scores
from vllm_kvcompress.methods.base import PREDICTOR_RANGE
from vllm_kvcompress.methods.dms.decisions import neuron_logits, without_decision_channel
from vllm_kvcompress.methods.dms.checkpoint import DMSDecisions

_DECODER_LAYER = re.compile(r"(^|\.)layers\.(\d+)$")
_ATTENTION = re.compile(r"(^|\.)layers\.(\d+)\.self_attn$")
_ROTARY = re.compile(r"(^|\.)layers\.(\d+)\.self_attn\.rotary_emb$")


def residual_stream(args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("positions", "hidden_states", "residual")
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    hidden, residual = values["hidden_states"], values.get("residual")
    return hidden if residual is None else hidden + residual


def keep_scores(decisions: DMSDecisions, layer: int, stream: torch.Tensor,
                heads: torch.Tensor | None = None) -> torch.Tensor:
    """``-z`` ``[T, KV heads]`` (fp32) of one layer's residual stream ``[T, hidden]``;
    ``heads``: this rank's KV heads as a device index (:func:`head_index`), None = all."""
    return _keep(decisions, decisions.adapters[layer](stream.to(torch.float32)), heads)


def head_index(decisions: DMSDecisions) -> torch.Tensor | None:
    """Tensor parallelism: the KV heads this rank keeps scores for, as an index on the
    adapters' device (a host list would be copied at every call, which a CUDA graph
    capture refuses); None where they are all the adapters' outputs."""
    proj = decisions.adapters[0].proj
    return buffered_scores.head_index(decisions.heads, proj.out_features, proj.weight.device)


def _keep(decisions: DMSDecisions, z: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    if decisions.per_layer:  # KV head 0 decides for every head
        z = z[:, :1].expand_as(z)
    return -(z if heads is None else z.index_select(1, heads))


def _hook(decisions: DMSDecisions, layer: int, heads: torch.Tensor | None, record):
    def hook(module, args, kwargs):
        started = time.perf_counter()
        with torch.no_grad(), torch.profiler.record_function(PREDICTOR_RANGE):
            scores = keep_scores(decisions, layer, residual_stream(args, kwargs), heads)
        record(layer, scores, time.perf_counter() - started)

    return hook


def query_channel_scores(decisions: DMSDecisions, query: torch.Tensor, num_q_heads: int,
                         num_kv_heads: int) -> torch.Tensor:
    """Single-neuron ``-z`` ``[T, KV heads]`` from the pre-RoPE query ``[T, Hq * D]``."""
    q = query.view(query.shape[0], num_q_heads, -1)
    return _keep(decisions, neuron_logits(q, num_kv_heads, decisions.scale, decisions.offset))


def _install_query_channel(model, decisions: DMSDecisions, record, num_layers: int, num_q_heads: int,
                           num_kv_heads: int) -> list:
    current = [None]  # the layer whose attention is running (the rotary module may be shared)

    def enter(layer):
        def hook(module, args, kwargs):
            current[0] = layer

        return hook

    def rotary(module, args, kwargs):
        started = time.perf_counter()
        names = ("positions", "query", "key")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        query = values["query"]
        with torch.profiler.record_function(PREDICTOR_RANGE):
            scores = query_channel_scores(decisions, query, num_q_heads, num_kv_heads)
            query = without_decision_channel(query.view(query.shape[0], num_q_heads, -1),
                                             num_kv_heads).reshape(query.shape)
        record(current[0], scores, time.perf_counter() - started)
        if "query" in kwargs:
            return args, {**kwargs, "query": query}
        return (*args[:1], query, *args[2:]), kwargs

    handles, entered, rotaries = [], set(), {}
    for name, module in model.named_modules(remove_duplicate=False):
        if (match := _ATTENTION.search(name)) is not None:
            entered.add(int(match.group(2)))
            handles.append(module.register_forward_pre_hook(enter(int(match.group(2))), with_kwargs=True))
        elif _ROTARY.search(name) is not None:
            rotaries[id(module)] = module
    if entered != set(range(num_layers)) or not rotaries:
        raise NotImplementedError(
            f"dms (single-neuron): found attention modules for layers {sorted(entered)} of {num_layers} and "
            f"{len(rotaries)} rotary modules; the model must have `...layers.<i>.self_attn.rotary_emb` called as "
            "rotary_emb(positions, query, key) on the pre-RoPE query (Llama/Qwen2/Qwen3 style)")
    handles += [m.register_forward_pre_hook(rotary, with_kwargs=True) for m in rotaries.values()]
    return handles


def install(model: torch.nn.Module, decisions: DMSDecisions, record, num_layers: int | None = None,
            num_q_heads: int | None = None, num_kv_heads: int | None = None) -> list:
    """Hook every decoder layer (all must be found); returns the hook handles.
    ``record(layer, scores [tokens, KV heads], seconds)`` receives each layer's keep scores."""
    if decisions.single_neuron:
        return _install_query_channel(model, decisions, record, num_layers, num_q_heads, num_kv_heads)
    heads = head_index(decisions)
    return [module.register_forward_pre_hook(_hook(decisions, layer, heads, record), with_kwargs=True)
            for layer, module in sorted(_decoder_layers(model, len(decisions.adapters)).items())]


def install_buffered(model: torch.nn.Module, decisions: DMSDecisions, max_tokens: int,
                     record) -> tuple[list, list[torch.Tensor], int]:
    """The engine's hooks (adapter checkpoints): each layer's keep scores of a step land in
    rows ``0 .. tokens - 1`` of that layer's buffer ``[max_tokens, KV heads]`` through the
    custom op of :mod:`~vllm_kvcompress.methods.buffered_scores`, which compiled graphs keep.
    Returns (handles, buffers by layer, install); ``record(layer, None, seconds)`` hears the time."""
    if decisions.single_neuron:
        raise NotImplementedError("dms: a single-neuron checkpoint changes the query inside the attention, which "
                                  "only eager hooks do (install)")
    heads = head_index(decisions)
    outputs = decisions.adapters[0].proj.out_features if heads is None else len(heads)

    return buffered_scores.install(_decoder_layers(model, len(decisions.adapters)),
                                   lambda layer: _linear_keep_scores(decisions, layer, heads), outputs,
                                   decisions.adapters[0].proj.weight.device, residual_stream, max_tokens, record)


def _linear_keep_scores(decisions: DMSDecisions, layer: int, heads: torch.Tensor | None):
    """:func:`keep_scores` of one layer as one linear head through ``ops.linear_scores`` (one
    launch on CUDA; the same numbers on the CPU), the sign and the offset folded in; this rank's
    heads selected from its output, as :func:`keep_scores` does (a GEMM over fewer rows rounds
    differently on the CPU)."""
    adapter = decisions.adapters[layer]
    weight, bias = adapter.proj.weight.detach(), adapter.proj.bias.detach()
    if decisions.per_layer:  # every output head 0's (as many as the adapter has: the same numbers as expand)
        weight, bias = weight[:1].expand_as(weight).contiguous(), bias[:1].expand_as(bias).contiguous()
    gain = adapter.norm.weight.detach()

    def score(stream: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(PREDICTOR_RANGE):
            scores = ops.linear_scores(stream, weight, bias, gain, adapter.norm.eps, -adapter.scale, adapter.offset)
            return scores if heads is None else scores.index_select(1, heads)

    return score


def _decoder_layers(model: torch.nn.Module, layers: int) -> dict[int, torch.nn.Module]:
    """Every decoder layer, by layer (all must be found)."""
    return buffered_scores.layer_modules(
        model, _DECODER_LAYER, layers, "dms", "the model's decoder layers must be `...layers.<i>` modules with a "
        "`self_attn`, called as layer(positions, hidden_states, residual)", accept=lambda m: hasattr(m, "self_attn"))
