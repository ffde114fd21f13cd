"""HeadKV (Fu et al., ICLR 2025): head-importance scores and per-head budgets.

Engine-neutral, plain Python/tensors. A *stream* is one (layer, KV head) of a request;
streams are numbered layer-major (``layer * num_kv_heads + head``).

Scores file (ours, JSON)::

    {"format": "kvcompress-head-scores/1", "model": ..., "num_layers": L,
     "num_attention_heads": Hq, "num_kv_heads": Hkv, "scores": [[Hq floats] x L], ...}

The published HeadKV files (``Important_Head/head_score/*.json``: ``"layer-head"`` ->
list of per-example scores) load too; importance is the mean of each list.

GQA rule (documented choice): the reference repeats K/V per query head and keeps a
budget per *query* head; we keep one stream per KV head, so a KV head's importance is
the **mean** of its query heads' normalised scores (its group shares one set of rows),
renormalised over all streams.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from vllm_kvcompress.methods.base import (KVCompressConfigError, Method, PagedSettings, check_number, check_path,
                                          key_name, setting)
from vllm_kvcompress.methods.snapkv import SnapKVScorer, WindowSettings

SCORES_FORMAT = "kvcompress-head-scores/1"


class HeadScoresError(ValueError):
    """A head-scores file that cannot be used with this model; the message names the file."""


@dataclass(frozen=True)
class HeadScores:
    scores: tuple[tuple[float, ...], ...]  # [layer][query head], normalised to sum 1
    num_kv_heads: int

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_attention_heads(self) -> int:
        return len(self.scores[0])

    def kv_head_scores(self) -> list[float]:
        """Importance per stream (layer-major), summing to 1 (the GQA rule above)."""
        group = self.num_attention_heads // self.num_kv_heads
        per_kv = [sum(row[h * group:(h + 1) * group]) / group for row in self.scores for h in range(self.num_kv_heads)]
        return _normalised(per_kv)

    @classmethod
    def uniform(cls, num_layers: int, num_attention_heads: int, num_kv_heads: int) -> "HeadScores":
        value = 1.0 / (num_layers * num_attention_heads)
        return cls(tuple((value,) * num_attention_heads for _ in range(num_layers)), num_kv_heads)

    def to_json(self, **meta) -> dict:
        return {"format": SCORES_FORMAT, "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
                "num_kv_heads": self.num_kv_heads, "scores": [list(row) for row in self.scores], **meta}


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    if not total > 0 or any(not math.isfinite(v) or v < 0 for v in values):
        raise HeadScoresError("head scores must be finite, non-negative and not all zero")
    return [v / total for v in values]


def load_head_scores(path: str | Path, num_layers: int, num_attention_heads: int, num_kv_heads: int) -> HeadScores:
    """Our JSON format or the published ``"layer-head" -> [scores]`` one, checked against the model."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # a binary file is not UTF-8 text
        raise HeadScoresError(f"head scores {path}: cannot read JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise HeadScoresError(f"head scores {path}: expected a JSON object")
    if raw.get("format") == SCORES_FORMAT:
        rows = raw.get("scores")
        shape = (raw.get("num_layers"), raw.get("num_attention_heads"), raw.get("num_kv_heads"))
        if shape != (num_layers, num_attention_heads, num_kv_heads):
            raise HeadScoresError(f"head scores {path}: made for (layers, query heads, KV heads) = {shape}, "
                                  f"model has {(num_layers, num_attention_heads, num_kv_heads)}")
    else:  # published HeadKV format
        rows = [[0.0] * num_attention_heads for _ in range(num_layers)]
        for key, values in raw.items():
            try:
                layer, head = (int(part) for part in key.split("-"))
                rows[layer][head] = sum(map(float, values)) / len(values) if values else 0.0
            except (ValueError, IndexError, TypeError) as exc:
                raise HeadScoresError(
                    f"head scores {path}: key {key!r} is not '<layer>-<query head>' within "
                    f"{num_layers} layers x {num_attention_heads} heads, or its value is not a list of numbers") from exc
    if (not isinstance(rows, list) or len(rows) != num_layers
            or any(not isinstance(r, list) or len(r) != num_attention_heads for r in rows)):
        raise HeadScoresError(f"head scores {path}: expected {num_layers} x {num_attention_heads} scores")
    try:
        flat = _normalised([float(v) for row in rows for v in row])
    except (TypeError, ValueError) as exc:
        raise HeadScoresError(f"head scores {path}: {exc}") from exc
    scores = tuple(tuple(flat[l * num_attention_heads:(l + 1) * num_attention_heads]) for l in range(num_layers))
    return HeadScores(scores, num_kv_heads)


def allocate_budgets(stream_scores: list[float], average: int, window: int, beta: float, page: int) -> list[int]:
    """Rows kept per stream, HeadKV's rule, aligned to whole pages of ``page`` rows.

    With ``b = average - window``, every stream gets ``b - floor(b / beta)`` and the
    streams share a pool ``floor(b / beta) * S`` in proportion to their scores, plus the
    window (the paper's Stage B). The real-valued budgets are then turned into whole
    pages by largest remainder, so the total stays ``round(S * average / page)`` pages
    (ties to the lower stream index), with at least one page per stream. Pure integer
    and float64 arithmetic: the scheduler and every worker get the same list."""
    streams = len(stream_scores)
    base = max(average - window, 0)
    shared = math.floor(base / beta)
    pool = shared * streams
    ideal = [(s * pool + base - shared + window) / page for s in stream_scores]
    floors = [max(math.floor(x), 1) for x in ideal]
    target = max(round(streams * average / page), streams)
    extra = target - sum(floors)
    order = sorted(range(streams), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    pages = list(floors)
    if extra > 0:
        for i in order[:extra]:
            pages[i] += 1
    while extra < 0:  # the one-page floor overshot: take pages back from the largest streams
        i = max(range(streams), key=lambda i: (pages[i], -i))
        if pages[i] <= 1:
            break
        pages[i] -= 1
        extra += 1
    return [p * page for p in pages]


@dataclass(frozen=True)
class HeadKVSettings(WindowSettings, PagedSettings):
    head_scores: str | None = setting(
        None, "HeadKV: head-importance file (JSON from `python -m vllm_kvcompress.offline.head_scores`, or a "
              "published HeadKV `\"layer-head\" -> [scores]` file), or `uniform` (every head equal = SnapKV). "
              "Required for `headkv`.")
    headkv_beta: float = setting(
        1.2, "HeadKV: the paper's beta > 1; each stream keeps `b - floor(b / beta)` and the rest is shared in "
             "proportion to the scores (b = budget - window).")

    def validate(self) -> None:
        super().validate()
        check_path("head_scores", self.head_scores, "headkv",
                   "a file from `python -m vllm_kvcompress.offline.head_scores --model MODEL --out FILE`, a published "
                   "HeadKV scores file, or \"uniform\"")
        check_number("headkv_beta", self.headkv_beta, lambda b: b > 1, "a number > 1")
        self.require_budget('headkv')


class HeadKV(Method):
    name = "headkv"
    Settings = HeadKVSettings
    summary = "SnapKV-style selection with a budget per (layer, KV head) from head-importance scores"
    evicts = True
    own_window = "window_tokens"

    def __init__(self, settings: HeadKVSettings):
        super().__init__(settings)
        self._stream_scores: dict[tuple, list[float]] = {}

    def stream_scores(self, shape) -> list[float]:
        """Importance per (layer, KV head) stream of the whole model; the file is read once."""
        key = (shape.num_layers, shape.num_attention_heads, shape.num_kv_heads)
        if key not in self._stream_scores:
            if self.settings.head_scores == "uniform":
                scores = HeadScores.uniform(*key)
            else:
                scores = load_head_scores(self.settings.head_scores, *key)
            self._stream_scores[key] = scores.kv_head_scores()
        return self._stream_scores[key]

    def check_model(self, shape, hf_config, block_size, tp_size) -> None:
        try:
            self.stream_scores(shape)
        except HeadScoresError as exc:
            raise KVCompressConfigError(f"{key_name('head_scores')}: {exc}") from None

    def schedule(self, prompt_len, budget, streams):
        if budget is None:
            return None
        s = self.settings
        budgets = streams.cached_budgets(
            ("headkv", budget), lambda: allocate_budgets(self.stream_scores(streams.model), budget, s.window_tokens,
                                                         s.headkv_beta, s.page_tokens))
        return streams.budget_schedule(prompt_len, budgets, s.page_tokens, window=s.window_tokens)

    def scorer(self):
        return SnapKVScorer(self.settings.window_tokens, self.settings.pool_kernel)
