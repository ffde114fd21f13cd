"""Whole-row eviction's decode metadata for a replayed CUDA graph (``dense_layout.DecodeBuffers``):
physical lengths and write slots refilled in place every step, padding rows included. vLLM's
CPU runner never pads a batch, so this is the only CPU check of the padded case."""

from types import SimpleNamespace

import torch

from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.vllm.dense_layout import DecodeBuffers
from vllm_kvcompress.vllm.state import RequestCache, WorkerState

BS = 16


def _metadata(logical: list[int], padded: int):
    """vLLM's metadata of a uniform decode batch padded to ``padded`` rows (lengths after the step)."""
    rows = len(logical) + padded
    table = torch.arange(rows * 8, dtype=torch.int32).view(rows, 8) + 1  # block ids > 0 (0 is the null block)
    table[len(logical):] = 0
    seq_lens = torch.tensor(logical + [0] * padded, dtype=torch.int32)
    slots = torch.tensor([-1] * rows)
    return SimpleNamespace(seq_lens=seq_lens, slot_mapping=slots, block_table_tensor=table,
                           max_seq_len=max(logical)), seq_lens


def test_fill_writes_physical_lengths_and_slots_in_place_and_pads():
    schedule = CompressionSchedule(compress_at=40, budget=20, buffer=16)  # holds 20..35 rows after the prompt
    state = WorkerState()
    state.requests = {"a": RequestCache(schedule), "b": RequestCache(None)}
    step = state.begin_step(["a", "b"])
    m, host = _metadata([60, 7], padded=2)
    buffers = DecodeBuffers(8, torch.device("cpu"))
    lens_before, slots_before = buffers.kv_lens, buffers.slots
    plan, longest = buffers.fill(m, 4, host, BS, step)
    # a: 59 tokens before the step hold physical_length(59) rows; the new one goes after them.
    held = schedule.physical_length(59)
    assert buffers.kv_lens[:4].tolist() == [held + 1, 7, 0, 0] and longest == max(held + 1, 7)
    table = m.block_table_tensor
    assert buffers.slots[:4].tolist() == [int(table[0, held // BS]) * BS + held % BS,
                                          int(table[1, 6 // BS]) * BS + 6 % BS, -1, -1]
    assert buffers.kv_lens is lens_before and buffers.slots is slots_before  # the captured addresses
    assert plan.decode_rows == [0, 1] and not schedule.compacts_at(60) and plan.compactions == []


def test_fill_plans_the_compaction_of_a_step_that_ends_on_a_point():
    schedule = CompressionSchedule(compress_at=40, budget=20, buffer=16)
    point = schedule.next_point(45)
    state = WorkerState()
    state.requests = {"a": RequestCache(schedule)}
    m, host = _metadata([point], padded=1)
    plan, _ = DecodeBuffers(4, torch.device("cpu")).fill(m, 2, host, BS, state.begin_step(["a"]))
    (c,) = plan.compactions
    assert (c.row, c.length, c.target) == (0, schedule.physical_length(point - 1) + 1, 20)


def test_capture_takes_vllms_logical_metadata():
    m, host = _metadata([30, 9], padded=0)
    m.slot_mapping = torch.tensor([100, 200])
    buffers = DecodeBuffers(4, torch.device("cpu"))
    plan, longest = buffers.fill(m, 2, host, BS, None)
    assert plan is None and longest == 30
    assert buffers.kv_lens[:2].tolist() == [30, 9] and buffers.slots[:2].tolist() == [100, 200]
