"""The plugin's counters on vLLM's ``/metrics`` (Prometheus) and in its periodic log.

=====================================  =======  ==================================================
``kvcompress:compression_ratio``        gauge    bytes the running requests' full-precision cache
                                                 would take / bytes they hold (block-granular)
``kvcompress:bytes_per_token``          gauge    KV bytes held per cached token, all layers and
                                                 TP ranks (running requests)
``kvcompress:tokens_evicted_total``     counter  token rows evicted, per request at its end
                                                 (per-head methods: the mean over KV heads)
``kvcompress:blocks_reclaimed_total``   counter  blocks a compaction gave back to vLLM's pool
=====================================  =======  ==================================================

Eviction's numbers live in the scheduler (EngineCore process) and ``/metrics`` is served
by the API server process. vLLM 0.32's ``SchedulerStats`` has no field for a plugin, so
the scheduler sends them as ``kvcompress:``-prefixed integer entries of its one
free-form ``dict[str, int]`` (``num_kv_fetch_reqs_by_stage``), and this stat logger -
plugins come first in vLLM's list - takes them out before vLLM's own loggers read that
dict. Methods without eviction (``none``, ``lookat``) have fixed ratios, set from the
config when the logger starts.
"""

from __future__ import annotations

import math

from vllm.logger import init_logger
from vllm.v1.metrics.loggers import StatLoggerBase

logger = init_logger("vllm.kvcompress.metrics")

PREFIX = "kvcompress:"
RATIO_SCALE = 1_000_000  # the ratio travels as an integer (the dict is typed dict[str, int])
FIELDS = ("compression_ratio", "bytes_per_token", "tokens_evicted_total", "blocks_reclaimed_total")


def dense_bytes_per_token(vllm_config) -> int:
    """K+V bytes of one token over every layer and KV head at the model's dtype."""
    model = vllm_config.model_config
    hf = model.hf_text_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return 2 * hf.num_hidden_layers * model.get_total_num_kv_heads() * head_dim * model.dtype.itemsize


class EvictionCounters:
    """Scheduler side: what eviction did, packed into ``SchedulerStats`` each step."""

    def __init__(self, vllm_config, block_bytes: int):
        self.block_bytes = block_bytes  # one block over all layers and TP ranks, as stored
        self.block_size = vllm_config.cache_config.block_size
        self.dense_block_bytes = dense_bytes_per_token(vllm_config) * self.block_size
        self.tokens_evicted = 0
        self.blocks_reclaimed = 0

    def request_ended(self, logical: int, schedule) -> None:
        if schedule is not None and logical > 0:
            self.tokens_evicted += max(0, round(logical - kept_tokens(schedule, logical)))

    def pack(self, running: list[tuple[int, int]]) -> dict[str, int]:
        """``running``: (logical tokens, blocks held) of each running request."""
        values = {"tokens_evicted_total": self.tokens_evicted, "blocks_reclaimed_total": self.blocks_reclaimed}
        tokens, held = sum(t for t, _ in running), sum(b for _, b in running)
        if tokens and held:
            native = sum(-(-t // self.block_size) for t, _ in running)
            values["compression_ratio"] = round(native * self.dense_block_bytes / (held * self.block_bytes) * RATIO_SCALE)
            values["bytes_per_token"] = round(held * self.block_bytes / tokens)
        # vLLM decodes this dict as dict[str, int]: one float and the API server's output
        # handler fails, taking the server down.
        return {PREFIX + key: int(value) for key, value in values.items()}


def kept_tokens(schedule, logical: int) -> float:
    """Token rows a request keeps at ``logical`` tokens (per-head schedules: the mean
    over every rank's KV heads; KVzap/DMS: page-granular, from the worker's report)."""
    if hasattr(schedule, "physical_length"):
        return schedule.physical_length(logical)
    if hasattr(schedule, "stream_lengths"):
        ranks = schedule.rank_budgets or (schedule.budgets,)
        lengths = [n for budgets in ranks for n in schedule.stream_lengths(logical, budgets)]
        return sum(lengths) / len(lengths)
    if schedule.pages_next is None or not schedule.packed(logical):
        return logical
    return min(logical, schedule.pages_next * schedule.page / schedule.streams)


class KVCompressStatLogger(StatLoggerBase):
    """``vllm.stat_logger_plugins`` entry point (API server process, one per engine)."""

    _metrics: dict | None = None  # prometheus_client refuses a second registration

    def __init__(self, vllm_config, engine_index: int = 0):
        from vllm_kvcompress.vllm.startup import kvcompress_selected

        self.enabled = kvcompress_selected(vllm_config)
        self.values: dict[str, float] = {}
        self.logged: dict[str, float] = {}
        if not self.enabled:
            return
        metrics = self._prometheus()
        labels = {"model_name": vllm_config.model_config.served_model_name, "engine": str(engine_index)}
        self.gauges = {name: metrics[name].labels(**labels) for name in FIELDS[:2]}
        self.counters = {name: metrics[name].labels(**labels) for name in FIELDS[2:]}
        self.seen = dict.fromkeys(FIELDS[2:], 0)
        for name, value in _fixed_values(vllm_config).items():
            self.gauges[name].set(value)
            self.values[name] = value
        for name in self.counters:
            self.values[name] = 0

    @classmethod
    def _prometheus(cls) -> dict:
        if cls._metrics is None:
            from prometheus_client import Counter, Gauge

            names = ["model_name", "engine"]
            cls._metrics = {
                "compression_ratio": Gauge(PREFIX + "compression_ratio", "Full-precision KV bytes of the running "
                                           "requests / KV bytes they hold (block-granular).", names),
                "bytes_per_token": Gauge(PREFIX + "bytes_per_token", "KV cache bytes held per cached token, all "
                                         "layers and tensor-parallel ranks (running requests).", names),
                "tokens_evicted_total": Counter(PREFIX + "tokens_evicted", "Token rows evicted from the KV cache "
                                                "(per-head methods: mean over KV heads).", names),
                "blocks_reclaimed_total": Counter(PREFIX + "blocks_reclaimed", "KV blocks returned to vLLM's pool "
                                                  "by compaction.", names),
            }
        return cls._metrics

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        carried = scheduler_stats.num_kv_fetch_reqs_by_stage
        ours = {key[len(PREFIX):]: carried.pop(key) for key in [k for k in carried if k.startswith(PREFIX)]}
        if not self.enabled or not ours:
            return
        for name, value in ours.items():
            if name in self.counters:
                self.counters[name].inc(max(0, value - self.seen[name]))
                self.seen[name] = max(value, self.seen[name])
                self.values[name] = self.seen[name]
            elif name in self.gauges:
                value = value / RATIO_SCALE if name == "compression_ratio" else value
                self.gauges[name].set(value)
                self.values[name] = value

    def log(self):
        if self.enabled and self.values != self.logged:
            v = self.values
            logger.info("kvcompress: compression %.2fx, %.0f bytes/token, %d tokens evicted, %d blocks reclaimed",
                        v.get("compression_ratio", math.nan), v.get("bytes_per_token", math.nan),
                        v.get("tokens_evicted_total", 0), v.get("blocks_reclaimed_total", 0))
            self.logged = dict(v)

    def log_engine_initialized(self):
        pass


def _fixed_values(vllm_config) -> dict[str, float]:
    """Methods that keep every token store it at a fixed row size."""
    from vllm_kvcompress.config import KVCompressConfig

    method = KVCompressConfig.from_additional_config(vllm_config.additional_config).build()
    if method.evicts:
        return {}
    dense = dense_bytes_per_token(vllm_config)
    hf = vllm_config.model_config.hf_text_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    row_bytes = method.row_bytes(head_dim, vllm_config.model_config.dtype)
    if row_bytes is None:
        return {"compression_ratio": 1.0, "bytes_per_token": dense}
    held = row_bytes * hf.num_hidden_layers * vllm_config.model_config.get_total_num_kv_heads()
    return {"compression_ratio": dense / held, "bytes_per_token": held}
