"""DMS (Łańcucki et al., NeurIPS 2025), engine-neutral parts: eviction decisions, the
delayed-eviction attention mask (the reference every engine path is compared with).
The retrofit objective lives in :mod:`vllm_kvcompress.offline.dms_objective`. Plain
tensors; no vLLM.

Decisions, per (layer, KV head, token), as the official Model-Optimizer code makes them:

* *adapter* mode: ``z = 100 * Linear(RMSNorm(x)) - 5`` on the residual stream before the
  attention's input norm; zero-initialised, so every token starts at ``z = -5`` (keep);
* *single-neuron* mode: ``z = 100 * q[..., -1] - 5`` from the last channel of the first
  query head of each GQA group, which is then zeroed so it leaves ``q . k``.

A token is marked for eviction iff ``z > 0``, with a **shift by one**: the logit computed
at position ``t`` decides token ``t - 1``. A marked token stays visible while it is in the
window (query ``i`` sees key ``j`` while ``i - j <= window``) and is gone afterwards.
"""

from __future__ import annotations

import torch

ALPHA_SCALE = 100.0
ALPHA_OFFSET = 5.0


class DMSAdapter(torch.nn.Module):
    """One layer's decision head: residual stream ``[T, hidden]`` -> logits ``[T, H_kv]``."""

    def __init__(self, hidden: int, num_kv_heads: int, eps: float = 1e-6, scale: float = ALPHA_SCALE,
                 offset: float = ALPHA_OFFSET):
        super().__init__()
        self.norm = torch.nn.RMSNorm(hidden, eps=eps)
        self.proj = torch.nn.Linear(hidden, num_kv_heads)
        self.scale, self.offset = scale, offset
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(self.norm(x)) - self.offset


def neuron_logits(query: torch.Tensor, num_kv_heads: int, scale: float = ALPHA_SCALE,
                  offset: float = ALPHA_OFFSET) -> torch.Tensor:
    """Single-neuron mode: ``query[T, Hq, D]`` -> logits ``[T, H_kv]`` (fp32)."""
    group = query.shape[1] // num_kv_heads
    return scale * query[:, ::group, -1].float() - offset


def without_decision_channel(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The query with the decision channel zeroed (it must not contribute to ``q . k``)."""
    group = query.shape[1] // num_kv_heads
    out = query.clone()
    out[:, ::group, -1] = 0
    return out


def eviction_flags(logits: torch.Tensor) -> torch.Tensor:
    """``logits[H, T]`` -> ``marked[H, T]``: token ``t`` is marked by the logit at ``t + 1``
    (shift by one); the last token's decision is not made yet (unmarked)."""
    marked = torch.zeros_like(logits, dtype=torch.bool)
    marked[:, :-1] = logits[:, 1:] > 0
    return marked


def visible(marked: torch.Tensor, window: int) -> torch.Tensor:
    """Reference DMS mask ``[H, T, T]`` (query, key): causal, and a marked key only while
    ``query - key <= window``."""
    length = marked.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = j <= i
    recent = (i - j) <= window
    return causal[None] & (recent[None] | ~marked[:, None, :])


