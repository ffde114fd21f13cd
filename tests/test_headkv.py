"""HeadKV, engine-neutral parts: head scores (ours and the published format), the GQA
rule, budget allocation, SnapKV-style scores, stream pages and the stream attention
reference."""

import json
import math

import pytest
import torch

from vllm_kvcompress.methods.headkv import HeadScoresError, allocate_budgets, load_head_scores
from vllm_kvcompress.methods.snapkv import SnapKVScorer
from vllm_kvcompress.eviction.selection import keep_indices, keep_indices_per_head
from vllm_kvcompress.eviction.streams import PoolGeometry, StreamPageTable, StreamSchedule, cdiv
from vllm_kvcompress.kernels import stream_attention_ref as ref


def test_uniform_scores_give_every_stream_the_average():
    assert allocate_budgets([1 / 90] * 90, 128, 8, 1.2, 16) == [128] * 90
    assert allocate_budgets([1 / 6] * 6, 64, 8, 1.005, 16) == [64] * 6


@pytest.mark.parametrize("average,beta", [(64, 1.005), (128, 1.2), (256, 2.0), (512, 10.0), (100, 1.5)])
def test_budgets_follow_scores_and_keep_the_total(average, beta):
    torch.manual_seed(0)
    scores = torch.rand(48).pow(3)
    scores = (scores / scores.sum()).tolist()
    budgets = allocate_budgets(scores, average, 8, beta, 16)
    assert all(b % 16 == 0 and b >= 16 for b in budgets)
    assert sum(budgets) // 16 == max(round(48 * average / 16), 48)  # the memory asked for, in whole pages
    order = sorted(range(48), key=lambda i: scores[i])
    # up to rounding (one page), a more important stream never gets less
    assert all(budgets[order[i]] <= budgets[order[j]] + 16 for i in range(48) for j in range(i, 48))
    base = average - 8 - math.floor((average - 8) / beta) + 8
    assert min(budgets) >= 16 * math.floor(base / 16) - 16
    assert budgets == allocate_budgets(scores, average, 8, beta, 16)  # pure: same on every process / rank


def test_published_format_and_gqa_rule(tmp_path):
    published = {f"{l}-{h}": [float(l * 4 + h), float(l * 4 + h) + 2] for l in range(2) for h in range(4)}
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(published))
    scores = load_head_scores(path, num_layers=2, num_attention_heads=4, num_kv_heads=2)
    means = [l * 4 + h + 1 for l in range(2) for h in range(4)]
    assert scores.scores[1][3] == pytest.approx(means[7] / sum(means))
    # KV head = mean of its query heads (groups of 2), renormalised over the 4 streams
    per_kv = [(means[0] + means[1]) / 2, (means[2] + means[3]) / 2, (means[4] + means[5]) / 2, (means[6] + means[7]) / 2]
    assert scores.kv_head_scores() == pytest.approx([v / sum(per_kv) for v in per_kv])
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(scores.to_json(model="x")))
    assert torch.allclose(torch.tensor(load_head_scores(ours, 2, 4, 2).scores), torch.tensor(scores.scores))


@pytest.mark.parametrize("content,reason", [
    ("not json", "cannot read JSON"),
    (json.dumps({"0-9": [1.0]}), "'0-9'"),
    (json.dumps({"format": "kvcompress-head-scores/1", "num_layers": 3, "num_attention_heads": 4, "num_kv_heads": 2,
                 "scores": []}), r"model has \(2, 4, 2\)"),
    (json.dumps({"0-0": [-1.0]}), "non-negative"),
])
def test_bad_score_files_are_refused_with_the_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HeadScoresError, match=reason) as info:
        load_head_scores(path, 2, 4, 2)
    assert str(path) in str(info.value)


def test_snapkv_scores_match_full_attention_of_the_window():
    torch.manual_seed(1)
    heads, group, length, dim, window = 2, 3, 40, 16, 8
    keys, queries = torch.randn(heads, length, dim), torch.randn(heads * group, length, dim)
    scores = SnapKVScorer(window, 7).score(keys, queries=queries[:, -window:])
    # reference: the full causal attention matrix, then its last `window` rows
    logits = queries @ keys.repeat_interleave(group, 0).transpose(1, 2) / math.sqrt(dim)
    logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(logits, -1)[:, -window:].reshape(heads, group * window, length).mean(1)
    prefix = weights[:, : length - window]
    pooled = torch.stack([prefix[:, max(0, i - 3): i + 4].max(1).values for i in range(length - window)], 1)
    assert torch.allclose(scores[:, : length - window], pooled, atol=1e-6)
    assert torch.isinf(scores[:, length - window:]).all()


def test_equal_budgets_per_head_select_as_uniform_snapkv():
    torch.manual_seed(2)
    scores = torch.rand(3, 200)
    assert all(torch.equal(a, b) for a, b in zip(keep_indices_per_head(scores, [64] * 3, 0, 8),
                                                   keep_indices(scores, 64, 0, 8)))
    varied = keep_indices_per_head(scores, [16, 64, 300], 0, 8)
    assert [len(k) for k in varied] == [16, 64, 200]
    assert set(range(192, 200)) <= set(varied[0].tolist())  # the window always stays


def test_stream_pages_cost_the_sum_of_budgets():
    budgets = (16, 48, 112, 128, 32, 64)  # 3 layers x 2 KV heads
    s = StreamSchedule(compress_at=500, budgets=budgets, page=16, block_size=128, window=8)
    assert s.pages_per_block == 6 * 128 // 16
    assert s.pages(500) == sum(cdiv(b, 16) for b in budgets) == 25
    assert s.rows_held(499) == 499 and s.rows_held(500) == 128  # 25 pages fit one block of 48
    geometry = PoolGeometry(num_layers=3, num_blocks=10, heads=2, block_size=128, page=16)
    blocks = [7, 2, 5]
    table = StreamPageTable.packed(torch.tensor(s.stream_lengths(500)), 16, geometry, torch.tensor(blocks),
                                   s.pages_per_block)
    assert table.used == s.pages(500)
    for logical in range(501, 700):
        table.grow(torch.tensor(s.stream_lengths(logical)))
        assert table.used == s.pages(logical)
        assert s.rows_held(logical) == cdiv(s.pages(logical), s.pages_per_block) * 128
    streams = [list(range(int(table.counts[st]))) for st in range(6)]
    slots = [int(table.slots[st, j]) for st in range(6) for j in streams[st]]
    assert sorted(slots) == list(range(table.used))  # every slot taken once
    pages = [int(table.ids[st, j]) for st in range(6) for j in streams[st]]
    assert pages == [geometry.slot_page(blocks, slot, s.pages_per_block) for slot in slots]
    assert len(set(pages)) == len(pages)  # no two streams share a page
    owned = {geometry.native_page(l, h, b, k) for l in range(3) for h in range(2) for b in blocks for k in range(8)}
    assert set(pages) <= owned  # and every page lies in the request's own blocks


def _sequential_slots(lengths_per_step: list[list[int]], page: int) -> list[list[int]]:
    """The slot lists a one-stream-at-a-time allocator takes (what StreamPageTable must match)."""
    slots, used = [[] for _ in lengths_per_step[0]], 0
    for lengths in lengths_per_step:
        for stream, length in enumerate(lengths):
            while len(slots[stream]) * page < length:
                slots[stream].append(used)
                used += 1
    return slots


def test_stream_page_table_takes_slots_in_stream_order_and_pads_with_the_first_page():
    generator = torch.Generator().manual_seed(5)
    page, streams = 8, 12
    geometry = PoolGeometry(num_layers=3, num_blocks=40, heads=4, block_size=16, page=page)
    per_block = streams * 16 // page
    steps = [torch.randint(1, 40, (streams,), generator=generator)]
    for _ in range(30):  # streams grow unevenly, some not at all in a step, some by several pages
        steps.append(steps[-1] + torch.randint(0, 3, (streams,), generator=generator) * torch.randint(
            0, 9, (streams,), generator=generator))
    blocks = torch.randperm(40, generator=generator)[:20]
    table = StreamPageTable.packed(steps[0], page, geometry, blocks, per_block)
    for lengths in steps[1:]:
        table.grow(lengths)
    want = _sequential_slots([x.tolist() for x in steps], page)
    assert [table.slots[st, : int(table.counts[st])].tolist() for st in range(streams)] == want
    pages = table.pages()
    assert pages.shape == (streams, max(map(len, want)))
    for st, slots in enumerate(want):
        assert pages[st, : len(slots)].tolist() == [geometry.slot_page(blocks.tolist(), x, per_block) for x in slots]
        assert (pages[st, len(slots):] == pages[st, 0]).all()  # padding: a page of its own
    assert (geometry.slot_pages(blocks, torch.arange(table.used), per_block)
            == torch.tensor([geometry.slot_page(blocks.tolist(), x, per_block) for x in range(table.used)])).all()


@pytest.mark.parametrize("ranks", [1, 2])
def test_stream_pages_by_residue_match_the_sum_over_streams(ranks):
    generator = torch.Generator().manual_seed(ranks)
    page, per_rank = 16, 24
    rank_budgets = tuple(tuple(torch.randint(1, 700, (per_rank,), generator=generator).tolist())
                         for _ in range(ranks))
    s = StreamSchedule(compress_at=500, budgets=rank_budgets[0], page=page, block_size=16 * 4,
                       rank_budgets=rank_budgets if ranks > 1 else ())
    for logical in [500, 501, 515, 516, 517, 900, 4097]:
        for budgets in rank_budgets:
            assert s.pages(logical, budgets) == sum(cdiv(n, page) for n in s.stream_lengths(logical, budgets))
        most = max(sum(cdiv(n, page) for n in s.stream_lengths(logical, b)) for b in rank_budgets)
        assert s.rows_held(logical) == cdiv(most, s.pages_per_block) * s.block_size
    assert s.kept_rows.tolist() == s.kept()
    for logical in [1, 17, 499]:  # before the compression every stream holds the whole prefix
        assert s.pages(logical) == s.pages(logical, rank_budgets[-1]) == per_rank * cdiv(logical, page)


def test_packed_slots_have_a_closed_form():
    """docs/design/stream-tables-on-device.md §2: after a budget compression, the slot of each
    stream's page is a pure function of the budgets and the page index, so a device kernel can
    compute it from the logical length alone. Checked against the table the worker grows."""
    generator = torch.Generator().manual_seed(7)
    page, streams, compress_at = 8, 20, 300
    budgets = tuple(torch.randint(1, 400, (streams,), generator=generator).tolist())
    s = StreamSchedule(compress_at=compress_at, budgets=budgets, page=page, block_size=16)
    geometry = PoolGeometry(num_layers=4, num_blocks=50, heads=5, block_size=16, page=page)
    table = StreamPageTable.packed(torch.tensor(s.stream_lengths(compress_at)), page, geometry,
                                   torch.arange(50), s.pages_per_block)
    for logical in range(compress_at + 1, compress_at + 90):
        table.grow(torch.tensor(s.stream_lengths(logical)))
    kept = s.kept()
    first = [cdiv(k, page) for k in kept]
    prefix = [sum(first[:i]) for i in range(streams)]
    rank = [sum(1 for o in range(i) if kept[o] % page == kept[i] % page) for i in range(streams)]

    def slot(stream: int, j: int) -> int:
        if j < first[stream]:
            return prefix[stream] + j
        growth = j * page + 1 - kept[stream]
        return s.pages(compress_at + growth - 1) + rank[stream]

    for stream in range(streams):
        have = table.slots[stream, : int(table.counts[stream])].tolist()
        assert have == [slot(stream, j) for j in range(len(have))]


def test_rows_at_matches_gathering_every_row():
    from vllm_kvcompress.vllm.stream_layout import rows_at

    pages = torch.randint(0, 100, (3, 2, 5))
    positions = torch.randint(0, 5 * 8, (3, 2, 4))
    assert torch.equal(rows_at(pages, positions, 8), ref.page_rows(pages, 8).gather(2, positions))


def _naive(query, keys, values, scale, causal_from=None):
    """One KV head's group of queries [q, G, D] over rows [T, D]."""
    logits = torch.einsum("qgd,td->gqt", query, keys) * scale
    if causal_from is not None:
        pos = causal_from + torch.arange(query.shape[0])
        logits = logits.masked_fill(torch.arange(keys.shape[0])[None, None] > pos[None, :, None], float("-inf"))
    return torch.einsum("gqt,td->qgd", torch.softmax(logits, -1), values)


def test_stream_attention_reference_matches_per_head_attention():
    torch.manual_seed(3)
    page, dim, heads, group = 16, 8, 2, 3
    pool = torch.randn(64 * page, 2 * dim)
    lengths = torch.tensor([[37, 5], [70, 16]])  # [requests, KV heads]: every head its own length
    pages = torch.stack([torch.randperm(64)[:5].view(1, 5).expand(heads, 5) + 0 for _ in range(2)])
    pages[:, 1] = torch.stack([torch.randperm(64)[:5] for _ in range(2)])
    query = torch.randn(2, heads * group, dim)
    out = ref.decode_attention(query, pool, pages, lengths, page, 0.3)
    for r in range(2):
        for h in range(heads):
            rows = pool[ref.page_rows(pages[r, h], page)[: lengths[r, h]]]
            want = _naive(query[r, h * group:(h + 1) * group][None], rows[:, :dim], rows[:, dim:], 0.3)[0]
            assert torch.allclose(out[r, h * group:(h + 1) * group], want, atol=1e-5)
    # a chunk after cached rows (per-head lengths, then equal ones), and a whole prompt
    for q_len, stream_lengths in ((4, lengths[1]), (4, torch.tensor([50, 50])), (50, torch.tensor([50, 50]))):
        chunk = torch.randn(q_len, heads * group, dim)
        out = ref.prefill_attention(chunk, pool, pages[1], stream_lengths, page, 0.3)
        for h in range(heads):
            rows = pool[ref.page_rows(pages[1, h], page)[: stream_lengths[h]]]
            want = _naive(chunk[:, h * group:(h + 1) * group], rows[:, :dim], rows[:, dim:], 0.3,
                          causal_from=int(stream_lengths[h]) - q_len)
            assert torch.allclose(out[:, h * group:(h + 1) * group], want, atol=1e-5)


def test_move_rows_reads_before_it_writes():
    pool = torch.arange(10.0).view(10, 1)
    ref.move_rows(pool, torch.tensor([3, 4, 5]), torch.tensor([4, 5, 6]))  # overlapping shift
    assert pool.flatten().tolist() == [0, 1, 2, 3, 3, 4, 5, 7, 8, 9]
