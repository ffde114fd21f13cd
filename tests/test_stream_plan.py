"""The stream step plan of a mixed batch (``stream_layout.build``): packed decodes are planned
together (``packed_decodes``); each request must get what it gets when it is planned alone
(a batch of one, the path the single-request engine and reference tests drive)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress.eviction.streams import PoolGeometry, StreamSchedule
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.vllm import stream_layout
from vllm_kvcompress.vllm.state import RequestCache, WorkerState

LAYERS, HEADS, BLOCK, PAGE, BLOCKS_EACH = 3, 2, 16, 8, 12
STREAMS = LAYERS * HEADS


def _requests(generator):
    """(req_id, cache, logical length before the step, tokens this step) of five requests in
    every layout: packed budgets (two), a DMS ring, a KVzap ring, a prompt chunk in vLLM's layout."""
    geometry = PoolGeometry(LAYERS, 5 * BLOCKS_EACH, HEADS, BLOCK, PAGE)
    table = torch.randperm(5 * BLOCKS_EACH, generator=generator).view(5, BLOCKS_EACH).int()
    made = []
    for r, kind in enumerate(["native", "budget", "dms", "budget", "kvzap"]):
        if kind in ("native", "budget"):
            budgets = tuple(torch.randint(4, 60, (STREAMS,), generator=generator).tolist())
            schedule = StreamSchedule(compress_at=80, budgets=budgets, page=PAGE, block_size=BLOCK)
        else:
            schedule = ThresholdSchedule(compress_at=80, ring=16, streams=STREAMS, page=PAGE, block_size=BLOCK,
                                         threshold=0.0, delayed=kind == "dms")
        cache = RequestCache(schedule)
        if kind == "native":
            made.append((f"r{r}", cache, 40, 5))
            continue
        computed = 80 + int(torch.randint(1, 30, (1,), generator=generator))
        if kind == "budget":
            lengths = schedule.stream_lengths(computed)
        else:
            cache.kept = torch.randint(0, 40, (LAYERS, HEADS), generator=generator)
            lengths = schedule.stream_rows(cache.kept).flatten()
            schedule.pages_next = schedule.pages_for(cache.kept)
        if kind == "budget":  # packed at the prompt end, then grown a step at a time, as decoding does
            cache.stream_table = stream_layout.packed_table(geometry, schedule.stream_lengths(80), table[r], schedule)
            stream_layout.grow_budget_table(cache.stream_table, schedule, computed, table[r])
        else:
            cache.stream_table = stream_layout.packed_table(geometry, lengths, table[r], schedule)
        made.append((f"r{r}", cache, computed, 1))
    return geometry, table, made


def _build(geometry, table, requests):
    state = WorkerState()
    state.requests = {req_id: cache for req_id, cache, _, _ in requests}
    step = state.begin_step([req_id for req_id, *_ in requests])
    step.host_block_table = table
    q_lens = [q for *_, q in requests]
    m = SimpleNamespace(query_start_loc_cpu=torch.tensor([0] + q_lens).cumsum(0), block_table_tensor=table,
                        num_actual_tokens=sum(q_lens))
    seq_lens = torch.tensor([computed + q for _, _, computed, q in requests])
    return stream_layout.build(m, len(requests), geometry, step, state.pool, seq_lens)


def _per_request(meta, tokens: range) -> dict:
    """What the plan holds for one request whose tokens are ``tokens`` of the step."""
    got = {"writes": meta.write_rows[:, tokens.start:tokens.stop]}
    decode = meta.decode_token_index.tolist()
    if tokens.start in decode and len(tokens) == 1:
        i = decode.index(tokens.start)
        width = meta.decode_pages.shape[-1]
        got.update(pages=meta.decode_pages[:, i], lengths=meta.decode_lengths[:, i], width=width)
    if meta.decision_token_index is not None:
        picked = [i for i, t in enumerate(meta.decision_token_index.tolist()) if t in tokens]
        got["decisions"] = ([meta.decision_token_index[i] - tokens.start for i in picked],
                            meta.decision_rows[:, picked])
    return got


def test_a_mixed_batch_plans_each_request_as_alone():
    geometry, table, requests = _requests(torch.Generator().manual_seed(0))
    # Alone first: their table rows, in a batch of one each (the tables grow once; growing again
    # to the same lengths takes nothing).
    alone, alone_victims = [], []
    for r, request in enumerate(requests):
        meta = _build(geometry, table[r:r + 1], [request])
        alone.append(_per_request(meta, range(0, request[3])))
        alone_victims.append(None if meta.victim_src is None else
                             (meta.victim_src[:, 0], meta.victim_dst[:, 0], meta.victim_kept[:, 0]))
    meta = _build(geometry, table, requests)
    assert meta.decode_pages.shape[1] == 4 and len(meta.prefills) == 1  # four packed decodes, one prompt chunk
    assert meta.victim_req_ids == ["r2", "r4"]
    start = 0
    for r, (req_id, cache, computed, q_len) in enumerate(requests):
        got, want = _per_request(meta, range(start, start + q_len)), alone[r]
        assert torch.equal(got["writes"], want["writes"]), req_id
        if "pages" in want:
            width = want["width"]
            assert torch.equal(got["pages"][..., :width], want["pages"]), req_id
            assert (got["pages"][..., width:] == got["pages"][..., :1]).all(), req_id  # padding: its first page
            assert torch.equal(got["lengths"], want["lengths"]), req_id
        if "decisions" in want and want["decisions"][0]:
            assert [int(t) for t in got["decisions"][0]] == [int(t) for t in want["decisions"][0]], req_id
            assert torch.equal(got["decisions"][1], want["decisions"][1]), req_id
        if alone_victims[r] is not None:
            v = meta.victim_req_ids.index(req_id)
            for have, expect in zip((meta.victim_src[:, v], meta.victim_dst[:, v], meta.victim_kept[:, v]),
                                    alone_victims[r]):
                assert torch.equal(have, expect), req_id
        start += q_len


def test_packed_decode_rows_are_where_each_layout_puts_the_new_token():
    """Budget layouts append (row ``length - 1`` of the stream); ring layouts overwrite the ring
    row of the token leaving the window, whose row first goes to the spare row ``ring + kept``;
    DMS decides the previous token, at ring row ``(after - 2) % ring``."""
    geometry, table, requests = _requests(torch.Generator().manual_seed(1))
    meta = _build(geometry, table, requests)
    decode = meta.decode_token_index.tolist()
    start = 0
    for req_id, cache, computed, q_len in requests:
        if q_len == 1:
            i = decode.index(start)
            pages = meta.decode_pages[:, i]  # [L, H, P]
            schedule, after = cache.schedule, computed + 1

            def row(position):
                return stream_layout.rows_at(pages, torch.as_tensor(position).expand(LAYERS, HEADS, 1), PAGE)[..., 0]

            if isinstance(schedule, StreamSchedule):
                lengths = torch.tensor(schedule.stream_lengths(after)).view(LAYERS, HEADS)
                assert torch.equal(meta.decode_lengths[:, i], lengths)
                want = stream_layout.rows_at(pages, (lengths - 1)[..., None], PAGE)[..., 0]
                assert torch.equal(meta.write_rows[:, start], want), req_id
            else:
                assert torch.equal(meta.write_rows[:, start], row((after - 1) % schedule.ring)), req_id
                v = meta.victim_req_ids.index(req_id)
                spare = stream_layout.rows_at(pages, (schedule.ring + cache.kept)[..., None], PAGE)[..., 0]
                assert torch.equal(meta.victim_dst[:, v], spare) and torch.equal(meta.victim_src[:, v],
                                                                               meta.write_rows[:, start])
                if schedule.delayed:
                    d = meta.decision_token_index.tolist().index(start)
                    assert torch.equal(meta.decision_rows[:, d], row((after - 2) % schedule.ring)), req_id
        start += q_len


def _budget_requests(seed: int):
    """Six packed budget requests (two share a schedule) at staggered lengths, with their tables."""
    generator = torch.Generator().manual_seed(seed)
    geometry = PoolGeometry(LAYERS, 6 * BLOCKS_EACH, HEADS, BLOCK, PAGE)
    table = torch.randperm(6 * BLOCKS_EACH, generator=generator).view(6, BLOCKS_EACH).int()
    shared = None
    made = []
    for r in range(6):
        budgets = tuple(torch.randint(0, 60, (STREAMS,), generator=generator).tolist())
        schedule = StreamSchedule(compress_at=70 + 3 * r, budgets=budgets, page=PAGE, block_size=BLOCK)
        if r == 4:
            schedule = shared
        shared = schedule
        computed = schedule.compress_at + int(torch.randint(0, 20, (1,), generator=generator))
        cache = RequestCache(schedule)
        cache.stream_table = stream_layout.packed_table(geometry, schedule.stream_lengths(schedule.compress_at),
                                                        table[r], schedule)
        stream_layout.grow_budget_table(cache.stream_table, schedule, computed, table[r])
        made.append((cache, computed))
    return geometry, table, made


def test_budget_decodes_planned_on_the_device_equal_the_host_plan():
    """docs/design/stream-tables-on-device.md §2: the closed form (``budget_decodes``, run here on
    CPU tensors) gives the host plan's pages, lengths and write rows, step after step across page
    boundaries. It leaves the host tables behind (no host work per decode); a host plan after it
    catches them up to what the host plan alone made, and plans that step as the host plan does."""
    runs = {}
    steps_on_device = 2 * PAGE + 3
    for name in ("host", "closed form"):
        geometry, table, requests = _budget_requests(3)
        before = [(cache.stream_table.counts.copy(), cache.stream_table.grown_to) for cache, _ in requests]
        steps = []
        for step in range(steps_on_device + 1):  # the last step: a host plan for both
            # Each request's block list as the builder passes it: the blocks its length needs
            # (longer as it grows; a catch-up sees only the last one).
            decodes = [stream_layout.PackedDecode(
                i, computed + step + 1, cache.schedule, cache,
                table[r, :-(-cache.schedule.rows_during(computed + step, computed + step + 1) // BLOCK)], f"r{r}", r)
                for i, (r, (cache, computed)) in enumerate(enumerate(requests))]
            if name == "closed form" and step == steps_on_device:
                for (cache, _), (counts, grown_to) in zip(requests, before):  # untouched until now
                    assert (cache.stream_table.counts == counts).all() and cache.stream_table.grown_to == grown_to
            plan = stream_layout.packed_decodes(geometry, decodes) if name == "host" or step == steps_on_device \
                else stream_layout.budget_decodes(geometry, decodes, table)
            steps.append(plan)
        runs[name] = (steps, [cache.stream_table for cache, _ in requests])
    for step, (want, got) in enumerate(zip(*(runs[n][0] for n in ("host", "closed form")))):
        assert got.longest == want.longest and got.tokens == want.tokens, step
        assert torch.equal(got.lengths, want.lengths), step
        assert torch.equal(got.writes, want.writes), step
        assert torch.equal(got.pages, want.pages), step  # the padding too: each stream's first page
    for want, got in zip(*(runs[n][1] for n in ("host", "closed form"))):
        assert (got.counts == want.counts).all() and (got.ids[:, : got.counts.max()] ==
                                                      want.ids[:, : want.counts.max()]).all()


def test_the_builder_plans_budget_decodes_on_a_cuda_pool_only(monkeypatch):
    """On the device: budget layouts of a pool on a device (CUDA here) given its block table; a
    CPU pool, a batch with a ring layout or no device table: the host plan."""
    calls = []
    geometry, table, requests = _budget_requests(4)
    decodes = [stream_layout.PackedDecode(i, computed + 1, cache.schedule, cache, table[i], f"r{i}", i)
               for i, (cache, computed) in enumerate(requests)]
    monkeypatch.setattr(stream_layout, "budget_decodes", lambda *args: calls.append(args) or "device plan")
    monkeypatch.setattr(stream_layout.ops, "host_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype))
    assert stream_layout.packed_decodes(geometry, decodes, "cpu", table) != "device plan"
    assert stream_layout.packed_decodes(geometry, decodes, "cuda") != "device plan"
    assert stream_layout.packed_decodes(geometry, decodes, "cuda", table) == "device plan"
    _, ring_table, mixed = _requests(torch.Generator().manual_seed(4))
    _, cache, computed, _ = mixed[2]  # a DMS ring: planned by ring_decodes, beside the budgets' device plan
    ring = stream_layout.PackedDecode(len(decodes), computed + 1, cache.schedule, cache, ring_table[2], "ring", 2)
    monkeypatch.setattr(stream_layout, "ring_decodes", lambda *args: calls.append(args) or "ring plan")
    monkeypatch.setattr(stream_layout, "_joined", lambda *parts: parts)
    assert stream_layout.packed_decodes(geometry, decodes + [ring], "cuda", table, "tables") == ("device plan",
                                                                                                 "ring plan")
    assert len(calls) == 3 and calls[2][1] == [ring] and calls[2][2] == "tables"
    with pytest.raises(RuntimeError, match="ring tables"):
        stream_layout.packed_decodes(geometry, [ring], "cuda", table)


def test_a_batch_with_budget_decodes_planned_on_the_device_builds_the_host_plan(monkeypatch):
    """The builder's path for a CUDA pool (packed budget decodes planned by ``budget_decodes``,
    joined with the host's chunks after the copy), run on CPU tensors: the same metadata as the
    host plan, for a batch with a prompt chunk and packed budget decodes."""
    def batch(seed):
        geometry, table, requests = _requests(torch.Generator().manual_seed(seed))
        native = requests[0][:3] + (1,)  # a single-token decode still in vLLM's layout: a host chunk, narrower
        return geometry, table[[1, 0, 3]], [requests[1], native, requests[3]]

    want = _build(*batch(5))
    host_plan = stream_layout.packed_decodes
    monkeypatch.setattr(stream_layout, "packed_decodes",
                        lambda g, decodes, device="cpu", block_table=None, *rest: host_plan(g, decodes, "cuda",
                                                                                          block_table, *rest))
    got = _build(*batch(5))
    assert got.decode_token_index.tolist() == [1, 0, 2]  # the host's decode chunk first, then the packed ones
    for name in ("write_rows", "decode_token_index", "decode_pages", "decode_lengths"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.max_decode_len == want.max_decode_len > 0


def test_a_step_of_several_tokens_keeps_the_closed_form():
    """A resumed request recomputes its output in steps of several tokens after its prompt was
    packed (``packed_budget_layout``); its table must still take its pages a growth at a time, or
    the device plan of its next decodes (the closed form) would read other pages than the host put
    its rows in."""
    plans = []
    for planner in ("host", "closed form"):
        geometry, table, requests = _budget_requests(6)
        cache, computed = requests[2]
        schedule = cache.schedule
        row = stream_layout.packed_budget_layout(geometry, table[2], computed + 2 * PAGE + 3, 2 * PAGE + 3, schedule,
                                                 cache, "r2", 0)
        assert row.positions.shape[-1] == 2 * PAGE + 3
        decode = [stream_layout.PackedDecode(0, computed + 2 * PAGE + 4, schedule, cache, table[2], "r2", 2)]
        plans.append(stream_layout.packed_decodes(geometry, decode) if planner == "host" else
                     stream_layout.budget_decodes(geometry, decode, table))
    assert torch.equal(plans[0].pages, plans[1].pages) and torch.equal(plans[0].writes, plans[1].writes)
