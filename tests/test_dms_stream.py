"""DMS inference on the per-stream layout, without vLLM: the plan/run glue
(``stream_attention.build`` + ``StreamRunner``) fed the decision logits of each step's
tokens (as the decoder-layer hooks give them) must give, for every query of every
prefill chunk and decode step, the attention of the masked reference
(:func:`vllm_kvcompress.methods.dms.decisions.visible`: window, shift by one), and hold
exactly ``window + kept`` rows per (layer, KV head) once the prompt is packed."""


import pytest
import torch
from masked_reference import drive, masked_attention

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.vllm.state import WorkerState
from vllm_kvcompress.methods.dms.decisions import eviction_flags, visible
from vllm_kvcompress.vllm.policy import EvictionPolicy
from vllm_kvcompress.eviction.threshold import ThresholdSchedule

LAYERS, HEADS, Q_HEADS, DIM, BLOCK, PAGE, RING, BLOCKS = 2, 2, 4, 8, 32, 8, 16, 12


def _settings():
    return KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "unused", "dms_window": RING,
                                       "page_tokens": PAGE})


@pytest.mark.parametrize("chunks", [[40], [13, 1, 26], [10]], ids=["one-prefill", "chunked", "short-prompt"])
def test_prefill_and_decode_match_the_masked_reference(chunks):
    torch.manual_seed(0)
    prompt, total = sum(chunks), 70
    q, k, v = torch.randn(LAYERS, total, Q_HEADS, DIM), torch.randn(LAYERS, total, HEADS, DIM), \
        torch.randn(LAYERS, total, HEADS, DIM)
    z = torch.randn(LAYERS, total, HEADS) * 3  # decision logits; about half the tokens get marked
    marked = torch.stack([eviction_flags(z[layer].T) for layer in range(LAYERS)])  # [L, H, T], shift by one
    mask = torch.stack([visible(marked[layer], RING) for layer in range(LAYERS)])  # [L, H, T, T]
    settings = _settings()
    schedule = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(prompt, None)
    assert isinstance(schedule, ThresholdSchedule) and schedule.delayed and schedule.compress_at == max(prompt, RING)

    held = None
    state = WorkerState()
    packed_steps = []

    def check(out, first, computed):
        nonlocal held
        for i in range(computed - first):
            pos = first + i
            torch.testing.assert_close(out[:, i], masked_attention(q, k, v, pos, mask[:, :, pos, : pos + 1]),
                                       atol=1e-5, rtol=1e-5)
        if computed >= schedule.compress_at:
            packed_steps.append(computed)
            kept = state.requests["r"].kept  # tokens that left the window and were not marked
            assert torch.equal(kept, (~marked[:, :, : computed - RING]).sum(-1))
            assert schedule.pages_next == schedule.pages_for(kept.flatten().tolist())
            held = schedule.stream_rows(0) - 1 + kept  # window + kept rows per stream
            assert int(held.sum()) <= LAYERS * HEADS * computed

    drive(settings, schedule, q, k, v, -z, chunks + [1] * (total - prompt), check,  # -z: the hooks' keep score
          BLOCKS, BLOCK, PAGE, state)
    assert len(packed_steps) == total - schedule.compress_at + 1
    assert int(held.sum()) < LAYERS * HEADS * total / 1.5  # about half of what left the window is gone


def test_a_wrong_shift_is_caught():
    """The reference is sensitive to the shift: unshifted flags give a different mask."""
    torch.manual_seed(0)
    z = torch.randn(HEADS, 40) * 3
    shifted, unshifted = visible(eviction_flags(z), RING), visible(z > 0, RING)
    assert not torch.equal(shifted, unshifted)
