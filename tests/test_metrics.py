"""The plugin's /metrics counters without a server: what the scheduler packs, and the
stat logger taking its entries out of vLLM's dict before vLLM's loggers read it."""

from types import SimpleNamespace

import pytest

from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.eviction.streams import StreamSchedule
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.vllm.metrics import PREFIX, RATIO_SCALE, EvictionCounters, kept_tokens

BLOCK = 128
DENSE = 2 * 30 * 3 * 64 * 2  # SmolLM2 bf16 K+V bytes per token


def _counters(block_bytes=DENSE * BLOCK):
    hf = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, hidden_size=576, head_dim=64)
    import torch

    model = SimpleNamespace(hf_text_config=hf, dtype=torch.bfloat16, get_total_num_kv_heads=lambda: 3)
    config = SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=BLOCK))
    return EvictionCounters(config, block_bytes)


def test_ratio_and_bytes_follow_the_blocks_held():
    counters = _counters()
    # 1000 and 300 logical tokens: vLLM would hold 8 + 3 blocks; eviction holds 2 + 3.
    packed = counters.pack([(1000, 2), (300, 3)])
    assert packed[PREFIX + "compression_ratio"] == round(11 / 5 * RATIO_SCALE)
    assert packed[PREFIX + "bytes_per_token"] == round(5 * DENSE * BLOCK / 1300)
    assert PREFIX + "compression_ratio" not in counters.pack([])  # idle: no ratio to report


def test_tokens_evicted_per_schedule_kind():
    budget = CompressionSchedule(compress_at=1000, budget=256, buffer=128)
    assert kept_tokens(budget, 1000) == 256 and kept_tokens(budget, 1100) == 356
    streams = StreamSchedule(compress_at=1000, budgets=(100, 300), page=32, block_size=BLOCK)
    assert kept_tokens(streams, 1000) == 200  # the mean over KV heads
    split = StreamSchedule(compress_at=1000, budgets=(100,), page=32, block_size=BLOCK, rank_budgets=((100,), (500,)))
    assert kept_tokens(split, 1000) == 300  # every rank's heads, not only this one's
    threshold = ThresholdSchedule(compress_at=512, ring=128, streams=4, page=32, block_size=BLOCK, threshold=0.0)
    assert kept_tokens(threshold, 900) == 900  # no report yet
    threshold.pages_next = 40
    assert kept_tokens(threshold, 900) == 40 * 32 / 4
    counters = _counters()
    counters.request_ended(1000, budget)
    counters.request_ended(50, None)  # never compressed
    assert counters.tokens_evicted == 744
    threshold.pages_next = 41  # 41 * 32 / 4 = 328 rows per head: a fractional mean is possible in general
    counters.request_ended(901, StreamSchedule(compress_at=100, budgets=(10, 11), page=32, block_size=BLOCK))
    packed = counters.pack([(901, 3)])
    # vLLM decodes the dict as dict[str, int]: a float here killed the API server (found by the soak)
    assert all(type(value) is int for value in packed.values()), packed


def test_stat_logger_takes_its_entries_out_of_vllms_dict(monkeypatch):
    from vllm_kvcompress.vllm import metrics

    logger = metrics.KVCompressStatLogger.__new__(metrics.KVCompressStatLogger)
    gauges = {name: SimpleNamespace(value=None, set=None) for name in metrics.FIELDS[:2]}
    for g in gauges.values():
        g.set = lambda v, g=g: setattr(g, "value", v)
    incs = {name: [] for name in metrics.FIELDS[2:]}
    counters = {name: SimpleNamespace(inc=incs[name].append) for name in incs}
    logger.enabled, logger.gauges, logger.counters = True, gauges, counters
    logger.seen, logger.values, logger.logged = dict.fromkeys(incs, 0), {}, {}
    stage = {"waiting_to_start": 0, PREFIX + "compression_ratio": 2_500_000, PREFIX + "bytes_per_token": 9000,
             PREFIX + "tokens_evicted_total": 700, PREFIX + "blocks_reclaimed_total": 5}
    logger.record(SimpleNamespace(num_kv_fetch_reqs_by_stage=stage), None)
    assert stage == {"waiting_to_start": 0}  # vLLM's loggers never see ours
    assert gauges["compression_ratio"].value == 2.5 and gauges["bytes_per_token"].value == 9000
    stage.update({PREFIX + "tokens_evicted_total": 1000, PREFIX + "blocks_reclaimed_total": 5})
    logger.record(SimpleNamespace(num_kv_fetch_reqs_by_stage=stage), None)
    assert incs == {"tokens_evicted_total": [700, 300], "blocks_reclaimed_total": [5, 0]}  # totals become increments


@pytest.mark.parametrize("settings,fixed", [({"method": "none"}, {"compression_ratio": 1.0, "bytes_per_token": DENSE}),
                                            ({"method": "knorm", "compression_ratio": 0.5}, {})])
def test_methods_without_eviction_report_fixed_values(smollm2_dir, settings, fixed):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvcompress.vllm.metrics import _fixed_values

    config = EngineArgs(model=smollm2_dir, max_model_len=2048, enforce_eager=True, attention_backend="kvcompress",
                        additional_config={"kvcompress": settings}).create_engine_config()
    assert _fixed_values(config) == fixed  # eviction methods: the scheduler reports live values
