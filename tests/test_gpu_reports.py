"""The GPU tools' own logic, on the CPU: how two engines' greedy outputs are compared (the
GPU oracles) and what the engine benchmark reads from a config's vLLM log."""

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
