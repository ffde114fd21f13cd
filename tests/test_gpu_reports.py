"""The GPU tools' own logic, on the CPU: how two engines' greedy outputs are compared (the
GPU oracles) and what the engine benchmark reads from a config's vLLM log."""

from types import SimpleNamespace

import pytest

from benchmarks import gpu_engine
from vllm_kvcompress.harness.gpu_generate import compare_greedy


def _output(tokens, chosen, tops):
    return {"token_ids": tokens, "token_logprobs": chosen, "top_logprobs": tops}


def test_compare_greedy_tells_a_near_tie_from_a_real_divergence():
    # prompt 0: each run prefers its own token by 0.1 nats (a rounding flip); prompt 1: the
    # candidate's token is 3.8 nats below in the reference; prompt 2: identical
    ref = {"outputs": [_output([1, 5, 9], [-0.5, -1.0, -0.1], [[[1, -0.5]], [[5, -1.0], [6, -1.1]], [[9, -0.1]]]),
                       _output([2, 5, 9], [-0.4, -0.2, -0.1], [[[2, -0.4]], [[5, -0.2], [6, -4.0]], [[9, -0.1]]]),
                       _output([3, 4], [-0.3, -0.2], [[[3, -0.3]], [[4, -0.2]]])]}
    cand = {"outputs": [_output([1, 6, 9], [-0.45, -1.0, -0.1], [[[1, -0.45]], [[6, -1.0], [5, -1.1]], [[9, -0.1]]]),
                        _output([2, 6, 9], [-0.4, -0.3, -0.1], [[[2, -0.4]], [[6, -0.3], [5, -0.5]], [[9, -0.1]]]),
                        _output([3, 4], [-0.3, -0.2], [[[3, -0.3]], [[4, -0.2]]])]}
    result = compare_greedy(ref, cand)
    assert result["same"] == 4 / 8  # positions before each prompt's divergence
    assert abs(result["gap"] - 0.05) < 1e-9
    assert [(p, s) for p, s, _ in result["ties"]] == [(0, 1)]
    assert [(p, s) for p, s, _ in result["splits"]] == [(1, 1)]


def test_identical_outputs_agree_everywhere():
    out = {"outputs": [_output([1, 2], [-0.1, -0.2], [[[1, -0.1]], [[2, -0.2]]])]}
    assert compare_greedy(out, out) == {"same": 1.0, "gap": 0.0, "ties": [], "splits": []}


LOG = """(EngineCore pid=1) INFO [gpu_model_runner.py] Capturing CUDA graphs (PIECEWISE): 100%|##| 51/51
(EngineCore pid=1) INFO Capturing CUDA graphs (FULL): 100%|##| 51/51
(EngineCore pid=1) INFO Graph capturing finished in 20 secs, took 0.60 GiB
(EngineCore pid=1) WARNING [jit_monitor.py:140] Triton kernel JIT compilation during inference: _lookat_decode_kernel. \
This causes a latency spike; consider extending warmup to cover this shape/config.
(EngineCore pid=1) WARNING [jit_monitor.py:140] Triton kernel JIT compilation during inference: _combine_kernel. x
(EngineCore pid=1) WARNING [jit_monitor.py:140] Triton kernel JIT compilation during inference: _lookat_decode_kernel. y
"""


def test_benchmark_reads_graphs_and_compiles_while_serving_from_the_log():
    lines = gpu_engine.graph_capture_lines(LOG)
    assert gpu_engine.captured_modes(lines) == "FULL+PIECEWISE"
    assert gpu_engine.jit_while_serving(LOG) == ["_lookat_decode_kernel", "_combine_kernel"]
    assert gpu_engine.jit_while_serving("no warnings") == []
    assert gpu_engine._cell([]) == "none" and gpu_engine._cell(["a", "b"]) == "a, b"


def test_a_timed_out_row_names_the_stages_it_did_not_reach():
    row = {"config": "x", "throughput_tok_s": 1.0, "tpot_ms_b1": 2.0, "tpot_ms_b32": 3.0, "timed_out": True,
           "partial": True, "error": "timed out after 240 s; (pid=1) WARNING Tokenizer not available"}
    assert gpu_engine.error_line(row) == "timed out after 240 s; not reached: long-context"
    assert gpu_engine.error_line({"error": "boom\nValueError: bad"}) == "ValueError: bad"
    busy = "another process held 19,600 MiB of the GPU at this config's start: its pool is smaller"
    assert gpu_engine.error_line(dict(row, error=busy + "; " + row["error"])) == \
        busy + "; timed out after 240 s; not reached: long-context"
    assert gpu_engine.error_line({"error": busy}) == busy


def test_a_leak_shows_in_the_summary_and_fails_the_sweep(tmp_path, monkeypatch):
    """A config whose blocks are not all free once its requests finished is marked in the
    table, and the sweep exits non-zero naming it."""
    meta = {"device": "H200", "date": "2026-12-04", "workload": "quick", "gpu_memory_utilization": 0.3,
            "model": "m", "command": "c"}
    rows = [{"config": "vllm-bf16", "throughput_tok_s": 10.0, "blocks_free_at_end": True},
            {"config": "knorm-4x", "throughput_tok_s": 20.0, "blocks_free_at_end": False}]
    _, table = gpu_engine.summarise(rows, meta)
    assert "| knorm-4x |" in table and "**no: leak**" in table and "| yes |" in table

    def fake_config(name, *_args):
        return dict(rows[["vllm-bf16", "knorm-4x"].index(name)]), None, "", False

    monkeypatch.setattr(gpu_engine, "run_config", fake_config)
    monkeypatch.setattr(gpu_engine, "_device_name", lambda: "H200")
    monkeypatch.setattr(gpu_engine, "plot_summary", lambda *_: None)
    args = SimpleNamespace(out=str(tmp_path), workload="quick", gpu_memory_utilization=None, argv=[],
                           deadline_s=None, config_timeout=330.0, cudagraph_mode=None)
    held = iter([None, 19_600])  # knorm-4x starts beside a killed engine's 19.6 GB
    monkeypatch.setattr(gpu_engine, "wait_for_idle_gpu", lambda: next(held))
    with pytest.raises(SystemExit, match="leak.*knorm-4x"):
        gpu_engine.sweep(args, ["vllm-bf16", "knorm-4x"])
    swept = {row["config"]: row for row in gpu_engine._rows(tmp_path)}
    assert "error" not in swept["vllm-bf16"]
    assert swept["knorm-4x"]["error"].startswith("another process held 19,600 MiB of the GPU")


def test_the_graph_fallback_runs_only_where_graphs_may_be_the_cause():
    helps = gpu_engine.graph_fallback_helps
    assert helps("knorm-4x", None, False, None)  # died before it started: capture may be why
    assert helps("knorm-4x", {"start_s": 80.0}, False, None)  # crashed while serving
    assert helps("knorm-4x", None, True, None)  # timed out during start-up
    assert not helps("knorm-4x", {"start_s": 80.0}, True, None)  # started, then slow
    assert not helps("kvzap-4x-eager", None, False, None)  # eager: no graphs to fall back from
    assert helps("kvzap-4x", None, False, None)  # compiled, PIECEWISE graphs
    assert not helps("vllm-bf16", None, False, None)  # vLLM's own
    assert not helps("knorm-4x", None, False, "PIECEWISE")  # already forced
    assert not helps("dms-4x", {"start_s": 111.0}, False, None, "torch.OutOfMemoryError: CUDA out of memory. Tried")


def test_a_config_waits_for_the_gpu_that_a_killed_engine_still_holds(monkeypatch):
    """vLLM sizes its pool from the memory free at start-up: the sweep waits for the GPU to be
    idle, and says how much was still held if it never became so."""
    monkeypatch.setattr(gpu_engine.time, "sleep", lambda _s: None)
    readings = iter([19_600, 19_600, 900])
    assert gpu_engine.wait_for_idle_gpu(limit_s=60, used_mib=lambda: next(readings)) == 900
    assert gpu_engine.wait_for_idle_gpu(limit_s=0, used_mib=lambda: 19_600) == 19_600
    assert gpu_engine.wait_for_idle_gpu(used_mib=lambda: None) is None


def test_range_time_comes_from_the_worker_trace(tmp_path):
    """--profile: a worker profiler range (compaction, predictor) in the worker's trace, host
    and GPU time per step; the other range's events are not counted."""
    import gzip
    import json

    events = [{"name": gpu_engine.COMPACTION_RANGE, "cat": "user_annotation", "dur": 3000.0},
              {"name": gpu_engine.COMPACTION_RANGE, "cat": "gpu_user_annotation", "dur": 1000.0},
              {"name": gpu_engine.COMPACTION_RANGE, "cat": "user_annotation", "dur": 1000.0},
              {"name": gpu_engine.COMPACTION_RANGE, "cat": "gpu_user_annotation", "dur": 200.0},
              {"name": gpu_engine.PREDICTOR_RANGE, "cat": "user_annotation", "dur": 400.0},
              {"name": gpu_engine.PREDICTOR_RANGE, "cat": "gpu_user_annotation", "dur": 40.0},
              {"name": "execute_context_0(0)_generation_32(32)", "cat": "gpu_user_annotation", "dur": 9000.0}]
    with gzip.open(tmp_path / "worker.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert gpu_engine.range_time(tmp_path, 4, gpu_engine.COMPACTION_RANGE) == {
        "ranges": 2, "host_ms_per_step": 1.0, "gpu_ms_per_step": 0.3}
    assert gpu_engine.range_time(tmp_path, 4, gpu_engine.PREDICTOR_RANGE) == {
        "ranges": 1, "host_ms_per_step": 0.1, "gpu_ms_per_step": 0.01}
    (tmp_path / "worker.pt.trace.json.gz").unlink()
    assert gpu_engine.range_time(tmp_path, 4, gpu_engine.COMPACTION_RANGE) is None


def test_the_worker_names_the_ranges_the_benchmark_reads():
    from vllm_kvcompress.methods.base import PREDICTOR_RANGE
    from vllm_kvcompress.vllm.runner import COMPACTION_RANGE

    assert (COMPACTION_RANGE, PREDICTOR_RANGE) == (gpu_engine.COMPACTION_RANGE, gpu_engine.PREDICTOR_RANGE)


def test_learned_hooks_run_inside_the_predictor_range():
    """The profile finds the hooks' work: KVzap's predictor runs inside PREDICTOR_RANGE."""
    import torch

    from vllm_kvcompress.methods.base import PREDICTOR_RANGE
    from vllm_kvcompress.methods.kvzap import hooks
    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor

    recorded = []
    hook = hooks._score(LinearPredictor(8, 2), 0, None, lambda layer, scores, seconds: recorded.append(scores))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hook(None, (), {"hidden_states": torch.randn(3, 8)})
    assert recorded and recorded[0].shape == (3, 2)
    assert any(event.name == PREDICTOR_RANGE for event in prof.events())


def test_stream_rows_synthetic_artefacts_load_for_the_benchmark_model(tmp_path):
    """The stream methods' rows: their synthetic artefacts load as the engine loads them, for
    the benchmark's model shape, with the properties the rows state."""
    import torch

    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.methods.dms.checkpoint import load_decisions
    from vllm_kvcompress.methods.headkv import load_head_scores
    from vllm_kvcompress.methods.kvzap.predictors import load_predictors

    model = gpu_engine.LLAMA_8B
    layers, hidden, kv_heads = model["num_hidden_layers"], model["hidden_size"], model["num_key_value_heads"]
    paths = {}
    for name in ("headkv-4x", "kvzap-4x", "dms-4x"):
        row = gpu_engine.CONFIGS[name]
        setting = row["artefact"]
        paths[setting] = gpu_engine.synthetic_artefact(setting, tmp_path, model)
        config = KVCompressConfig.from_dict(dict(row["kvcompress"], **{setting: str(paths[setting])}))
        assert config.spec.evicts and not config.whole_row_eviction
        assert row["env"] == {"KVCOMPRESS_CUDA_STREAMS": "experimental"}
    scores = load_head_scores(paths["head_scores"], layers, model["num_attention_heads"], kv_heads).kv_head_scores()
    assert max(scores) > 10 * min(scores)  # budgets differ per stream
    predictors = load_predictors(paths["kvzap_predictor"], layers, hidden, kv_heads)
    states = torch.randn(4096, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert predictors[0](states).std() > 0.5  # scores spread, not constant
        decisions = load_decisions(str(paths["dms_adapters"]), layers, hidden, kv_heads)
        evicted = (decisions.adapters[3](states) > 0).float().mean().item()
    assert decisions.window == gpu_engine.DMS_WINDOW
    assert abs(evicted - gpu_engine.DMS_EVICTED) < 0.03  # the stated share, on unit-RMS states


def test_a_bf16_row_cut_short_still_gives_the_ratios_of_the_stages_it_measured():
    meta = {"device": "H200", "date": "2026-12-04", "workload": "full", "gpu_memory_utilization": 0.85,
            "model": "m", "command": "c"}
    bf16 = {"config": "vllm-bf16", "capacity_tokens": 800, "throughput_tok_s": 100.0, "tpot_ms_b1": 6.0,
            "timed_out": True, "error": "timed out after 330 s"}
    other = {"config": "headkv-4x", "capacity_tokens": 808, "throughput_tok_s": 47.0, "tpot_ms_b1": 16.0,
             "long_context_tok_s": 9.0}
    summary, text = gpu_engine.summarise([bf16, other], meta)
    row = next(r for r in summary["rows"] if r["config"] == "headkv-4x")
    assert (row["capacity_ratio"], row["throughput_ratio"], row["tpot_ratio_b1"]) == (1.01, 0.47, 2.67)
    assert "long_context_ratio" not in row and "| 0.47 |" in text


def test_tpot_takes_the_faster_of_two_prefill_runs(monkeypatch):
    """kvzap-4x's first B=32 prefill-only run took 1.2 s longer than the prefill in the run after
    it, so its TPOT came out 0.91 ms (h200-eviction-13): the prefill is timed again after the
    long run and the faster one counts."""
    runs = iter([(23.4, 32), (22.2 + 64 * 0.02, 32 * 65), (22.2, 32)])  # prefill, prefill + 64 steps of 20 ms, prefill
    monkeypatch.setattr(gpu_engine, "_timed", lambda llm, prompts, max_tokens: next(runs))
    monkeypatch.setattr(gpu_engine, "_prompts", lambda *args: None)
    tpot, detail = gpu_engine._tpot(None, 32, 16384, 64)
    assert tpot == 20.0 and detail["prefill_runs_s"] == [23.4, 22.2] and detail["prefill_s"] == 22.2
