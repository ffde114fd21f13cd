"""Thresholded eviction with a sliding window (KVzap's inference rule, as kvpress's
``DMSPress`` applies it): after each forward, a token that has left the newest
``window`` tokens is evicted *for one KV head* when its score for that head is below
``threshold``. Decisions are permanent, so every (layer, KV head) stream keeps a
different number of tokens.

Memory layout of a stream once packed (pure functions here, used by the engine glue):

* rows ``0 .. window-1`` are a ring holding the newest ``window`` tokens (token at
  logical position ``p`` lives in ring row ``p % window``);
* rows ``window ..`` hold the survivors that left the ring (``kept`` of them), in order,
  plus one spare row.

In a decode step for position ``p`` the token leaving the window is ``p - window``: it is
copied to the spare row (row ``window + kept``) *before* token ``p`` overwrites its ring
row, so the step's attention still sees it (it is evicted after the attention, as in
kvpress). After the attention ``kept`` grows by one where its score passes. Attention
therefore reads exactly rows ``0 .. window + kept`` of every stream: the window, the
step's own token, the leaving token and the survivors - no mask, no gaps.

The prompt is stored in vLLM's own layout until ``compress_at = max(prompt, window)``
(so chunked prefill is vLLM's); that step's end packs it: ring = the last ``window``
tokens, survivors = earlier tokens whose score passes.

Lengths depend on the scores, which only the worker sees: after every step the worker
reports the pages it needs for the next one (:attr:`ThresholdSchedule.pages_next`), and
the scheduler reads them before it schedules that step (async scheduling is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.eviction.streams import cdiv


def ring_stream_rows(ring, kept):
    """Rows a packed stream needs for its next step: its ring, its ``kept`` survivors and the
    spare row (ints, tensors or arrays; a batch's rings broadcast against its survivors)."""
    return ring + kept + 1


def pages_for_batch(schedules: list, kept: torch.Tensor) -> list[int]:
    """:meth:`ThresholdSchedule.pages_for` of many requests at once (``kept[R, streams]``): the
    step's reports, where a call per request cost ~17 us each, 5 ms at B=320."""
    ring = torch.tensor([s.ring for s in schedules])[:, None]
    page = torch.tensor([s.page for s in schedules])[:, None]
    return (-(-ring_stream_rows(ring, kept) // page)).sum(dim=1).tolist()


@dataclass
class ThresholdSchedule:
    compress_at: int  # logical length at which the prompt is packed: max(prompt, window)
    ring: int  # the window: newest tokens never evicted (a whole number of pages)
    streams: int  # layers x KV heads
    page: int  # rows per stream page
    block_size: int  # rows per vLLM block (of every stream)
    threshold: float
    # DMS: each token's score arrives with the *next* token (shift by one), and prompt
    # queries already attend under the rule (KVzap's prompt attends to everything).
    delayed: bool = False
    pages_next: int | None = None  # stream pages the next step needs (the worker's report)

    def __post_init__(self):
        if self.ring % self.page or self.block_size % self.page or self.compress_at < self.ring:
            raise ValueError(f"invalid threshold schedule {self}")

    @property
    def pages_per_block(self) -> int:
        return self.streams * self.block_size // self.page

    def packed(self, logical: int) -> bool:
        return logical >= self.compress_at

    def compacts_at(self, logical: int) -> bool:
        return logical == self.compress_at

    def masks_decode(self, logical: int) -> bool:
        """Whether a single-token decode to ``logical`` tokens in vLLM's layout attends under the
        delayed rule's mask: only once a token older than the window exists. A prompt packs at
        ``max(prompt, window)``, so an unpacked one never gets there: its decodes are plain
        (and may replay a graph); a mask would be all true."""
        return self.delayed and not self.packed(logical - 1) and logical - 1 > self.ring

    def next_point(self, logical: int) -> int:
        """Steps end at the packing point, and once packed every step is one token
        (each token leaving the window is decided on its own), also when a preempted
        request recomputes its output."""
        return self.compress_at if logical < self.compress_at else logical + 1

    def stream_rows(self, kept):
        """Rows a packed stream with ``kept`` survivors (an int or a tensor) needs for its next step."""
        return ring_stream_rows(self.ring, kept)

    def pages_for(self, kept_per_stream) -> int:
        """Stream pages the next step needs with ``kept_per_stream`` survivors (a tensor or a list)."""
        return pages_for_batch([self], torch.as_tensor(kept_per_stream, dtype=torch.long).reshape(1, -1))[0]

    def rows_held(self, logical: int) -> int:
        if not self.packed(logical) or self.pages_next is None:
            return logical
        return cdiv(self.pages_next, self.pages_per_block) * self.block_size

    def rows_during(self, computed: int, total: int) -> int:
        if computed >= self.compress_at:
            return self.rows_held(total)
        if total == self.compress_at:  # the packing step: see packing_rows
            return max(total, self.packing_rows())
        return total

    def packing_rows(self) -> int:
        """Block rows the packing step may lay out: every stream keeps at most all
        ``compress_at`` tokens plus the spare row, in whole pages. This can be one block
        more than the native prompt held (a prompt shorter than the window always packs
        ``ring + 1`` rows into a one-``ring`` block); the next step's report frees it."""
        per_stream = cdiv(self.compress_at + 1, self.page) * self.page
        return cdiv(per_stream, self.block_size) * self.block_size


@dataclass(frozen=True)
class ThresholdRule:
    """kvpress's ``DMSPress`` rule around a scorer: a token that has left the newest
    ``window`` tokens is evicted for a KV head when its score is below ``threshold``.
    ``delayed``: each score arrives with the next token (DMS's shift by one), and prompt
    queries already attend under the rule."""

    threshold: float
    window: int
    delayed: bool = False

    def schedule(self, prompt_len: int, streams: int, page: int, block_size: int) -> "ThresholdSchedule":
        return ThresholdSchedule(compress_at=max(prompt_len, self.window), ring=self.window, streams=streams,
                                 page=page, block_size=block_size, threshold=float(self.threshold),
                                 delayed=self.delayed)


def prompt_survivors(scores: torch.Tensor, threshold: float, window: int) -> list[torch.Tensor]:
    """Rows of a ``[H, T]`` prompt (``T >= window``) that survive its packing, per head:
    positions before the window whose score passes, ascending."""
    before = scores[:, : scores.shape[1] - window]
    return [torch.nonzero(row >= threshold).flatten() for row in before]


def ring_order(length: int, window: int) -> torch.Tensor:
    """Positions of the last ``window`` of ``length`` tokens in ring-row order
    (ring row ``j`` holds the position ``p`` with ``p % window == j``)."""
    positions = torch.arange(length - window, length)
    return positions[torch.argsort(positions % window)]


def visible(scores: torch.Tensor, threshold: float, window: int, prompt: int, query_pos: int) -> torch.Tensor:
    """Reference mask ``[H, query_pos + 1]``: which tokens the query at ``query_pos``
    attends to under the rule (prompt queries see the whole causal prompt; a decode
    query at ``p`` sees positions ``>= p - window`` and earlier ones whose score
    passes). ``scores[H, >= query_pos + 1]``."""
    heads = scores.shape[0]
    positions = torch.arange(query_pos + 1)
    if query_pos < max(prompt, window):
        return torch.ones(heads, query_pos + 1, dtype=torch.bool)
    recent = positions >= query_pos - window
    return recent[None, :] | (scores[:, : query_pos + 1] >= threshold)
