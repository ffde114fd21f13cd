"""Deterministic compression points, shared by the scheduler and the worker.

The scheduler frees blocks and the worker compacts rows without talking to each other:
both evaluate the same pure function of a request's *logical* length (tokens whose
K/V have been computed). A request's cache holds ``physical_length(L)`` rows.

* Until ``compress_at`` (default: the prompt length) every token is stored.
* At ``compress_at`` the cache is compacted to ``budget`` rows (if it holds more).
* Afterwards rows are appended; when a step leaves ``budget + buffer`` rows, the cache
  is compacted back to ``budget``.

The scheduler never lets a step cross a compression point (a step may end on one), so
the points, and hence the decisions, are the same with chunked prefill and after a
preemption that recomputes prompt and output in one go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompressionSchedule:
    compress_at: int  # logical length of the first compression (end of prompt)
    budget: int  # rows kept at each compression
    buffer: int  # rows appended between decode-time compressions (>= 1)
    window: int = 0  # the step that compresses must hold the prompt's last `window` tokens (SnapKV queries)

    def __post_init__(self):
        if self.budget < 1 or self.buffer < 1 or self.compress_at < 1:
            raise ValueError(f"invalid schedule {self}")

    def _appended(self, logical: int) -> int:
        """Rows there would be after the first compression if none followed (logical >= compress_at)."""
        return min(self.compress_at, self.budget) + logical - self.compress_at

    def physical_length(self, logical: int) -> int:
        """Rows held once every compression up to ``logical`` tokens has run."""
        if logical < self.compress_at:
            return logical
        rows = self._appended(logical)
        if rows < self.budget + self.buffer:
            return rows
        return self.budget + (rows - self.budget) % self.buffer

    def compacts_at(self, logical: int) -> bool:
        """Whether the step that ends at ``logical`` tokens compacts the cache."""
        if logical < self.compress_at:
            return False
        if logical == self.compress_at:
            return self.compress_at > self.budget
        rows = self._appended(logical)
        return rows >= self.budget + self.buffer and (rows - self.budget) % self.buffer == 0

    def next_point(self, logical: int) -> int:
        """The first compression point strictly after ``logical``."""
        if logical < self.compress_at:
            return self.compress_at
        rows = self._appended(logical)
        if rows < self.budget + self.buffer:
            return logical + self.budget + self.buffer - rows
        return logical + self.buffer - (rows - self.budget) % self.buffer

    def rows_held(self, logical: int) -> int:
        """Rows whose blocks stay held once ``logical`` tokens are computed (and compacted)."""
        return self.physical_length(logical)

    def rows_during(self, computed: int, total: int) -> int:
        """Rows a step from ``computed`` to ``total`` tokens writes into (compaction comes after)."""
        return self.physical_length(computed) + total - computed

    def max_rows(self) -> int:
        """Most rows ever held: ``compress_at`` during prefill, else budget + buffer."""
        return max(self.compress_at, self.budget + self.buffer)
