"""Stream requests batched as the runner batches them: two requests that start at different
steps (the second's prompt chunks share steps with the first's decodes, then both decode with
their rings or budgets at other positions) give each request what it gets alone, for every
stream layout (HeadKV budgets, KVzap's and DMS's rings). The GPU twin, CUDA against this CPU
run: ``tests/test_gpu_streams.py``."""

import json

import pytest
import torch

from masked_reference import Request, drive, drive_many

LAYERS, Q_HEADS, HEADS, DIM = 2, 4, 2, 16
BLOCK, PAGE, BLOCKS = 16, 8, 24


def stream_settings(method: str, tmp_path):
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.methods.headkv import HeadScores

    if method == "headkv":
        raw = torch.rand(LAYERS, Q_HEADS, generator=torch.Generator().manual_seed(0)) ** 3 + 1e-3
        path = tmp_path / "head_scores.json"
        path.write_text(json.dumps(HeadScores(tuple(map(tuple, (raw / raw.sum()).tolist())), HEADS).to_json()))
        return KVCompressConfig.from_dict({"method": "headkv", "head_scores": str(path), "max_kv_tokens": 48,
                                           "page_tokens": PAGE})
    if method == "kvzap":
        return KVCompressConfig.from_dict({"method": "kvzap", "kvzap_predictor": "unused", "kvzap_window": 32,
                                           "kvzap_threshold": 0.0, "page_tokens": PAGE})
    return KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "unused", "dms_window": 32,
                                       "page_tokens": PAGE})


def staggered(settings, device="cpu", dtype=torch.float32, no_sync=False, seed=0):
    """Outputs per request and step of two staggered requests batched, and of each alone."""
    from vllm_kvcompress.vllm.policy import EvictionPolicy

    generator = torch.Generator().manual_seed(seed)
    policy = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS))
    plans = [("a", 150, 40, [100, 50], 0), ("b", 120, 30, [64, 56], 7)]  # id, prompt, decodes, chunks, start
    made = []
    for req_id, prompt, decodes, chunks, start in plans:
        total = prompt + decodes
        tensors = [torch.randn(LAYERS, total, h, DIM, generator=generator) for h in (Q_HEADS, HEADS, HEADS)]
        scores = torch.randn(LAYERS, total, HEADS, generator=generator) * 3  # about half pass a threshold of 0
        made.append((req_id, prompt, chunks + [1] * decodes, start, tensors, scores))

    def request(req_id, prompt, steps, start, tensors, scores, outs):
        return Request(req_id, policy.schedule_for(prompt, None), *tensors, scores, steps,
                       lambda out, first, computed: outs.append(out), start)

    together = {req_id: [] for req_id, *_ in made}
    drive_many(settings, [request(*spec, together[spec[0]]) for spec in made], BLOCKS, BLOCK, PAGE,
               device=device, dtype=dtype, no_sync=no_sync)
    alone = {}
    for req_id, prompt, steps, start, tensors, scores in made:
        outs = alone[req_id] = []
        drive(settings, policy.schedule_for(prompt, None), *tensors, scores, steps,
              lambda out, first, computed, outs=outs: outs.append(out), BLOCKS, BLOCK, PAGE, device=device,
              dtype=dtype, no_sync=no_sync)
    return together, alone


@pytest.mark.parametrize("method", ["headkv", "kvzap", "dms"])
def test_two_staggered_requests_batched_get_what_each_gets_alone(method, tmp_path):
    together, alone = staggered(stream_settings(method, tmp_path))
    for req_id in together:
        assert len(together[req_id]) == len(alone[req_id]) >= 32
        for step, (have, want) in enumerate(zip(together[req_id], alone[req_id])):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5, msg=lambda text: f"{req_id} {step}: {text}")
