"""Engine-neutral eviction pieces: compression schedule, selection, scorers, and the
compaction kernels (PyTorch reference; Triton under the interpreter on CPU)."""

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401
from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.methods.knorm import KnormScorer
from vllm_kvcompress.eviction.selection import keep_indices

compaction_ref, compaction_triton = import_kernels("compaction_ref", "compaction_triton")


def _simulate(schedule: CompressionSchedule, steps: list[int]) -> list[tuple[int, int, bool]]:
    """Step-by-step truth: append rows, compact when a step ends on a point."""
    logical = rows = 0
    trace = []
    for n in steps:
        logical += n
        rows += n
        compacted = schedule.compacts_at(logical)
        if compacted:
            rows = min(rows, schedule.budget)
        trace.append((logical, rows, compacted))
    return trace


@pytest.mark.parametrize("prompt,budget,buffer", [(700, 200, 128), (100, 200, 128), (300, 300, 16), (129, 1, 1)])
def test_schedule_matches_step_by_step(prompt, budget, buffer):
    s = CompressionSchedule(compress_at=prompt, budget=budget, buffer=buffer)
    trace = _simulate(s, [prompt] + [1] * 600)
    for logical, rows, _ in trace:
        assert s.physical_length(logical) == rows
        assert rows <= s.max_rows()
    points = [logical for logical, _, compacted in trace if compacted]
    assert (points[0] == prompt) == (prompt > budget)
    # next_point walks exactly the compaction points (and the prompt end)
    walked, at = [], 0
    while at < trace[-1][0]:
        at = s.next_point(at)
        walked.append(at)
    assert [p for p in walked if s.compacts_at(p) and p <= trace[-1][0]] == points


def test_schedule_chunked_prefill_capped_at_points_is_identical():
    """A recompute after preemption prefills prompt + output; capping each chunk at the
    next point reproduces the original physical lengths."""
    s = CompressionSchedule(compress_at=500, budget=100, buffer=64)
    original = _simulate(s, [500] + [1] * 300)
    logical, chunks = 0, []
    while logical < 800:
        n = min(s.next_point(logical), 800) - logical
        chunks.append(n)
        logical += n
    replay = _simulate(s, chunks)
    final = dict((l, r) for l, r, _ in original)
    assert all(final[l] == r for l, r, _ in replay)
    assert chunks[:3] == [500, 64, 64]


def test_keep_indices_protects_and_breaks_ties_by_position():
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0, 5.0, -1.0, 0.0, 0.0]])
    assert keep_indices(scores, 3).tolist() == [[1, 2, 4]]
    assert keep_indices(scores, 3, sink_tokens=1).tolist() == [[0, 1, 2]]
    assert keep_indices(scores, 4, sink_tokens=1, recent_tokens=2).tolist() == [[0, 1, 6, 7]]
    assert keep_indices(scores, 10).tolist() == [list(range(8))]


def test_knorm_keeps_lowest_norm_per_head():
    keys = torch.zeros(2, 5, 4)
    keys[0, :, 0] = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.5])
    keys[1, :, 1] = torch.tensor([1.0, 9.0, 8.0, 0.1, 7.0])
    keep = keep_indices(KnormScorer().score(keys.bfloat16()), 2)
    assert keep.tolist() == [[1, 4], [0, 3]]


def _paged_case(lens, heads=3, bs=4, width=10, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 2
    cache = torch.randn(num_blocks, heads, bs, width, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    used = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[used:used + n].int()
        used += n
    return cache, table, g


def _rows(cache, blocks, n):
    bs = cache.shape[2]
    pages = cache[blocks[: -(-n // bs)].long()]  # [nb, H, bs, W]
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[-1])[:, :n]


def test_compaction_reference_moves_kept_rows():
    cache, table, g = _paged_case([13, 9])
    before = [_rows(cache, table[r], n).clone() for r, n in enumerate([13, 9])]
    keep = [torch.sort(torch.randperm(n, generator=g)[:k].expand(3, k).clone(), dim=1).values for n, k in ((13, 6), (9, 9))]
    keep[0][1] = torch.tensor([0, 1, 2, 10, 11, 12])  # heads keep different rows
    for r in range(2):
        compaction_ref.compact(cache, table[r].long(), keep[r])
        after = _rows(cache, table[r], keep[r].shape[1])
        expect = torch.stack([before[r][h, keep[r][h]] for h in range(3)])
        assert torch.equal(after, expect)


@pytest.mark.parametrize("two_phase", [False, True])
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 16), (torch.uint8, 44)])
def test_compaction_triton_matches_reference(interpreter, dtype, width, two_phase):
    lens, kept = [37, 20, 5], [12, 20, 3]
    cache, table, g = _paged_case(lens, width=width, bs=8, dtype=torch.float32)
    cache = (cache * 40).to(dtype) if dtype == torch.uint8 else cache.to(dtype)
    keep = torch.zeros(3, 3, max(kept), dtype=torch.int32)
    for r, (n, k) in enumerate(zip(lens, kept)):
        for h in range(3):
            keep[r, h, :k] = torch.sort(torch.randperm(n, generator=g)[:k]).values
    expect = cache.clone()
    compaction_ref.compact_batch(expect, table.long(), keep.long(), torch.tensor(kept))
    out = cache.to(DEV)
    compaction_triton.compact_batch(out, table.to(DEV), keep.to(DEV), torch.tensor(kept, dtype=torch.int32).to(DEV),
                                    block_r=8, two_phase=two_phase)
    assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("sink,recent", [(0, 0), (2, 3)])
def test_batched_selection_keeps_what_each_request_keeps(sink, recent):
    """One sort for a batch of compactions (padded rows, a target per request) keeps
    each request's rows of :func:`keep_indices`, ties included (bf16-rounded scores)."""
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch

    gen = torch.Generator().manual_seed(3)
    lengths, targets = [40, 23, 31, 9], [16, 16, 8, 12]
    scores = torch.randn(4, 3, 40, generator=gen).to(torch.bfloat16).float()
    batch = BatchTargets.of(lengths, targets, scores.device)
    keep = keep_indices_batch(scores, batch, sink, recent)
    assert batch.keep_lens.tolist() == [16, 16, 8, 9] and keep.shape == (4, 3, 16)
    for r, (length, target) in enumerate(zip(lengths, targets)):
        want = keep_indices(scores[r, :, :length], target, sink, recent)
        assert torch.equal(keep[r, :, : batch.keep_lens[r]], want), r


def test_ascending_is_a_sort_with_padding_last():
    from vllm_kvcompress.eviction.selection import ascending

    gen = torch.Generator().manual_seed(6)
    width, most = 50, 20
    chosen = torch.stack([torch.randperm(width, generator=gen)[:most] for _ in range(12)]).view(3, 4, most)
    chosen[0, 1, 7:] = width  # padding past a shorter request's count
    chosen[2, 3, :] = width  # a request keeping nothing
    assert torch.equal(ascending(chosen, width), torch.sort(chosen, dim=-1).values)


def test_selection_of_every_layer_at_once_is_each_layer_alone():
    """The step's selection for all layers (``scores[L, R, H, T]``) keeps what each
    layer's own selection keeps."""
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch

    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 4, 2, 40, generator=gen).to(torch.bfloat16).float()
    targets = BatchTargets.of([40, 23, 31, 9], [16, 16, 8, 12], scores.device)
    every = keep_indices_batch(scores, targets, 1, 2)
    assert every.shape == (3, 4, 2, 16)
    for layer in range(3):
        assert torch.equal(every[layer], keep_indices_batch(scores[layer], targets, 1, 2)), layer


def test_scorers_and_selection_stay_on_the_keys_device():
    """On the "meta" device a tensor made on the host and mixed in fails, as it would on
    CUDA (SnapKV built its mask and scores on the host: the first H200 run failed)."""
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch
    from vllm_kvcompress.methods.snapkv import SnapKVScorer

    keys, queries = torch.empty(2, 40, 16, device="meta"), torch.empty(4, 8, 16, device="meta")
    scores = SnapKVScorer(window=8, kernel=7).score(keys, queries)
    assert scores.device.type == "meta"
    assert keep_indices(scores, 10, 2, 3).device.type == "meta"
    assert keep_indices(scores, 50).device.type == "meta"
    batch = KnormScorer().score_batch(torch.empty(3, 2, 40, 16, device="meta"), [40, 30, 20])
    targets = BatchTargets.of([40, 30, 20], [10, 10, 10], batch.device)
    assert keep_indices_batch(batch, targets, 1, 2).device.type == targets.keep_lens.device.type == "meta"
