"""HeadKV's per-(layer, KV head) streams on a CUDA pool (marker ``gpu``; skipped without a
CUDA GPU): the step plan and the stream runners of every layer, driven as the engine's
runner does (``masked_reference.drive``), on CUDA (the Triton stream decode) against the
same run on the CPU (the PyTorch ops), both in bf16, with every layer's forward under CUDA's
sync debug mode "error": no step reads the device back. Run with
``python3 -m pytest -m gpu tests/test_gpu_streams.py`` (docs/gpu.md)."""

import json

import pytest
import torch

from masked_reference import drive

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS, Q_HEADS, HEADS, DIM = 3, 8, 2, 64
BLOCK, PAGE, BLOCKS = 16, 8, 96


def _headkv(tmp_path, budget: int):
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.methods.headkv import HeadScores
    from vllm_kvcompress.vllm.policy import EvictionPolicy

    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(LAYERS, Q_HEADS, generator=generator) ** 3 + 1e-3
    path = tmp_path / "head_scores.json"
    path.write_text(json.dumps(HeadScores(tuple(map(tuple, (raw / raw.sum()).tolist())), HEADS).to_json()))
    settings = KVCompressConfig.from_dict({"method": "headkv", "head_scores": str(path), "max_kv_tokens": budget,
                                           "page_tokens": PAGE})
    return settings, EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS))


def _compiled() -> int:
    """Kernels compiled so far by the stream decode (its main kernel and the split combine)."""
    from vllm_kvcompress.kernels.dense_triton import _dense_decode_kernel
    from vllm_kvcompress.kernels.triton_common import _combine_kernel

    return sum(len(cache[0]) for fn in (_dense_decode_kernel, _combine_kernel) for cache in fn.device_caches.values())


# First in this file: the kernels must not have been compiled by another test of this process.
def test_stream_warm_up_leaves_nothing_to_compile_while_serving(tmp_path):
    from vllm_kvcompress.kernels import ops

    torch.manual_seed(0)
    pool = torch.zeros(LAYERS * BLOCKS * HEADS * BLOCK, 2 * DIM, dtype=torch.bfloat16, device="cuda")
    before = _compiled()
    assert ops.warm_up_stream_decode(pool, PAGE, Q_HEADS, HEADS, DIM, torch.bfloat16, max_len=4096)
    warmed = _compiled()
    assert warmed > before  # it compiled something, so the check below is not vacuous
    shapes = [(1, 3000, 375, torch.long), (3, 200, 25, torch.long), (2, 16, 2, torch.long), (4, 9, 2, torch.long),
              (1, 8, 1, torch.long), (8, 1000, 128, torch.long), (5, 4000, 512, torch.int32)]  # int32: graph buffers
    for batch, length, width, dtype in shapes:
        query = torch.randn(batch, Q_HEADS, DIM, dtype=torch.bfloat16, device="cuda")
        pages = torch.randint(0, pool.shape[0] // PAGE, (batch, HEADS, width), device="cuda", dtype=dtype)
        lengths = torch.randint(1, length + 1, (batch, HEADS), device="cuda")
        ops.stream_decode(query, pool, pages, lengths, PAGE, DIM ** -0.5, max_kv_len=length)
    torch.cuda.synchronize()
    assert _compiled() == warmed  # serving-shaped decodes found every kernel compiled


def test_headkv_streams_on_cuda_match_the_cpu_and_never_read_back(tmp_path, monkeypatch):
    torch.manual_seed(0)
    prompt, total, budget = 200, 216, 48
    q, k, v = (torch.randn(LAYERS, total, h, DIM) for h in (Q_HEADS, HEADS, HEADS))
    scores = torch.zeros(LAYERS, total, HEADS)
    settings, policy = _headkv(tmp_path, budget)
    assert len(set(policy.schedule_for(prompt, None).budgets)) > 1  # the heads' budgets differ
    steps = [120, 80] + [1] * (total - prompt)  # a chunked prompt whose second chunk compresses, then decodes
    from vllm_kvcompress.kernels import ops

    chosen, choose = [], ops.implementation

    def recording(op, *tensors, **kwargs):  # which kernels the runs really took
        kind = choose(op, *tensors, **kwargs)
        chosen.append((op, kind))
        return kind

    monkeypatch.setattr(ops, "implementation", recording)
    outputs, kernels = {}, {}
    for device in ("cpu", "cuda"):
        chosen.clear()
        got = outputs[device] = []
        drive(settings, policy.schedule_for(prompt, None), q, k, v, scores, steps,
              lambda out, first, computed: got.append(out), BLOCKS, BLOCK, PAGE, device=device,
              dtype=torch.bfloat16, no_sync=True)
        kernels[device] = {kind for op, kind in chosen if op == "stream_decode"}
    assert kernels == {"cpu": {"reference"}, "cuda": {"triton"}}  # the decode steps ran the Triton stream kernel
    assert len(outputs["cuda"]) == len(steps)
    for step, (want, have) in enumerate(zip(outputs["cpu"], outputs["cuda"])):
        torch.testing.assert_close(have, want, atol=2e-2, rtol=2e-2, msg=lambda text: f"step {step}: {text}")


def _threshold_settings(method: str):
    from vllm_kvcompress.config import KVCompressConfig

    if method == "kvzap":
        return KVCompressConfig.from_dict({"method": "kvzap", "kvzap_predictor": "unused", "kvzap_window": 32,
                                           "kvzap_threshold": 0.0, "page_tokens": PAGE})
    return KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "unused", "dms_window": 32,
                                       "page_tokens": PAGE})


@pytest.mark.parametrize("method", ["kvzap", "dms"])
def test_ring_streams_on_cuda_match_the_cpu_and_read_back_once_per_step(method, monkeypatch):
    """KVzap's threshold rule and DMS (ring + survivors, decided one token per step): the
    plan and runners of every layer on CUDA against the CPU, with the scores the hooks would
    give. No layer reads the device back (sync debug mode "error"; the prompt's packing step
    reads its survivor counts once, at the last layer); each step's survivors are read back
    once, after the forward (``StepPlan.settle_reports``), and equal the CPU's."""
    from vllm_kvcompress.vllm.policy import EvictionPolicy
    from vllm_kvcompress.vllm.state import WorkerState

    torch.manual_seed(0)
    prompt, total = 150, 190
    q, k, v = (torch.randn(LAYERS, total, h, DIM) for h in (Q_HEADS, HEADS, HEADS))
    # Keep scores, about half of them passing: a token's survival is decided by its sign.
    scores = torch.randn(LAYERS, total, HEADS) * 3
    settings = _threshold_settings(method)
    policy = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS))
    steps = [100, 50] + [1] * (total - prompt)  # a chunked prompt, packed at its end, then ring decodes
    outputs, kept = {}, {}
    for device in ("cpu", "cuda"):
        state = WorkerState()
        got = outputs[device] = []
        counts = kept[device] = []
        drive(settings, policy.schedule_for(prompt, None), q, k, v, scores, steps,
              lambda out, first, computed: (got.append(out), counts.append(
                  None if state.requests["r"].kept is None else state.requests["r"].kept.clone())),
              BLOCKS, BLOCK, PAGE, state=state, device=device, dtype=torch.bfloat16, no_sync=True)
    assert all(c is None or c.device.type == "cpu" for c in kept["cuda"])  # left on the host for the next plan
    assert [None if c is None else c.tolist() for c in kept["cuda"]] == \
        [None if c is None else c.tolist() for c in kept["cpu"]]
    assert kept["cuda"][-1] is not None and 0 < int(kept["cuda"][-1].sum()) < LAYERS * HEADS * (total - 32)
    for step, (want, have) in enumerate(zip(outputs["cpu"], outputs["cuda"])):
        torch.testing.assert_close(have, want, atol=2e-2, rtol=2e-2, msg=lambda text: f"step {step}: {text}")


@pytest.mark.parametrize("method", ["headkv", "kvzap", "dms"])
def test_two_staggered_requests_on_cuda_match_the_cpu(method, tmp_path):
    """Two requests batched as the runner batches them (the second's prompt chunks beside the
    first's decodes, then both decoding at other ring positions; ``test_stream_batches``): on
    CUDA (Triton stream decode, no read-back inside a layer) as on the CPU, and as each alone."""
    from test_stream_batches import staggered, stream_settings

    settings = stream_settings(method, tmp_path)
    runs = {device: staggered(settings, device=device, dtype=torch.bfloat16, no_sync=device == "cuda")
            for device in ("cpu", "cuda")}
    for req_id, want in runs["cpu"][0].items():
        for name, have in (("batched", runs["cuda"][0][req_id]), ("alone", runs["cuda"][1][req_id])):
            assert len(have) == len(want)
            for step, (got, expected) in enumerate(zip(have, want)):
                torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2,
                                           msg=lambda text: f"{req_id} {name} step {step}: {text}")
