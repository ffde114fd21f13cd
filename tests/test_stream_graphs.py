"""Stream decodes replayed from CUDA graphs: a batch of single-token decodes goes through
persistent buffers (``StreamDecodeBuffers``), one row per token, padding rows empty, and
attends exactly as the step's own plan; a step that compresses is kept off the graphs (the
runner forces it eager). On the GPU: ``tests/test_gpu_engine.py`` (FULL decode graphs)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress.eviction.streams import PoolGeometry, StreamSchedule
from vllm_kvcompress.kernels import stream_attention_ref
from vllm_kvcompress.vllm import stream_layout
from vllm_kvcompress.vllm.runner import EvictionRunnerMixin
from vllm_kvcompress.vllm.state import RequestCache, WorkerState

LAYERS, HEADS, BLOCK, PAGE, BLOCKS_EACH, MAX_LEN = 2, 2, 16, 8, 12, 192
STREAMS = LAYERS * HEADS


def _batch(generator, kinds, q_lens=None):
    """Requests in batch order: ``budget`` (packed, decoding), ``native`` (a prompt in vLLM's
    layout, one token this step) or ``plain`` (no schedule)."""
    geometry = PoolGeometry(LAYERS, len(kinds) * BLOCKS_EACH + 1, HEADS, BLOCK, PAGE)
    # Block 0 stays out of every request (vLLM's null block, where padding rows write).
    table = (torch.randperm(len(kinds) * BLOCKS_EACH, generator=generator) + 1).view(len(kinds), BLOCKS_EACH).int()
    requests = []
    for r, kind in enumerate(kinds):
        budgets = tuple(torch.randint(4, 60, (STREAMS,), generator=generator).tolist())
        schedule = StreamSchedule(compress_at=80, budgets=budgets, page=PAGE, block_size=BLOCK)
        cache = RequestCache(None if kind == "plain" else schedule)
        computed = 40 + r if kind != "budget" else 80 + int(torch.randint(1, 30, (1,), generator=generator))
        if kind == "budget":
            cache.stream_table = stream_layout.packed_table(geometry, schedule.stream_lengths(80), table[r], schedule)
            stream_layout.grow_budget_table(cache.stream_table, schedule, computed, table[r])
        requests.append((f"r{r}", cache, computed, 1 if q_lens is None else q_lens[r]))
    return geometry, table, requests


def _plan(geometry, table, requests, padded: int):
    state = WorkerState()
    state.requests = {req_id: cache for req_id, cache, _, _ in requests}
    step = state.begin_step([req_id for req_id, *_ in requests])
    step.host_block_table = table
    q_lens = [q for *_, q in requests]
    m = SimpleNamespace(query_start_loc_cpu=torch.tensor([0] + q_lens + [1] * (padded - len(q_lens))).cumsum(0),
                        block_table_tensor=table, num_actual_tokens=padded)
    seq_lens = torch.tensor([computed + q for _, _, computed, q in requests])
    return stream_layout.build(m, len(requests), geometry, step, state.pool, seq_lens), step, state


@pytest.mark.parametrize("kinds", [["budget", "native", "budget", "plain"], ["budget"] * 3])
def test_a_decode_batch_in_the_graph_buffers_attends_as_its_plan(kinds):
    generator = torch.Generator().manual_seed(len(kinds))
    geometry, table, requests = _batch(generator, kinds)
    padded = len(kinds) + 3  # a graph's batch size
    planned, step, state = _plan(geometry, table, requests, padded)
    assert planned.decode_token_index.tolist() != list(range(len(kinds))) or kinds == ["budget"] * 3
    buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, 16, MAX_LEN, PAGE, torch.device("cpu"))
    buffers.pages.fill_(7)  # an earlier step's rows: whatever they hold must not matter
    buffers.lengths.fill_(5)
    buffers.write_rows.fill_(9)
    meta = buffers.fill(planned, padded, geometry, step, state.pool, planned.max_decode_len)
    assert meta.decode_token_index is None and meta.write_rows.shape[1] == meta.decode_pages.shape[1] == padded
    assert meta.decode_pages.data_ptr() == buffers.pages.data_ptr()  # the addresses a graph captured
    real = len(kinds)
    assert torch.equal(meta.write_rows[:, :real], planned.write_rows)
    assert (meta.write_rows[:, real:] == 0).all() and (meta.decode_lengths[:, real:] == 0).all()

    pool = torch.randn(geometry.num_layers * geometry.num_blocks * HEADS * BLOCK, 2 * 16, generator=generator)
    query = torch.randn(padded, 2 * HEADS, 16, generator=generator)
    order = planned.decode_token_index
    for layer in range(LAYERS):
        want = stream_attention_ref.decode_attention(query[order], pool, planned.decode_pages[layer],
                                                     planned.decode_lengths[layer], PAGE, 0.25,
                                                     planned.max_decode_len)
        got = stream_attention_ref.decode_attention(query, pool, meta.decode_pages[layer],
                                                    meta.decode_lengths[layer], PAGE, 0.25, meta.max_decode_len)
        torch.testing.assert_close(got[order], want)


def test_graph_capture_reads_buffers_with_every_row_padding():
    geometry = PoolGeometry(LAYERS, 10, HEADS, BLOCK, PAGE)
    buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, 8, MAX_LEN, PAGE, torch.device("cpu"))
    buffers.lengths.fill_(3)
    meta = buffers.fill(None, 4, geometry, None, WorkerState().pool, MAX_LEN)
    # Its width: a multiple of 16 pages (the row stride the kernel warm-up compiles for).
    assert meta.max_decode_len == MAX_LEN and meta.decode_pages.shape == (LAYERS, 4, HEADS, 32)
    assert (meta.decode_lengths == 0).all() and (meta.write_rows == 0).all() and not meta.python_only


def test_a_step_with_a_prompt_chunk_is_not_put_in_the_graph_buffers():
    geometry, table, requests = _batch(torch.Generator().manual_seed(3), ["budget", "native"], q_lens=[1, 5])
    planned, step, state = _plan(geometry, table, requests, 2)
    assert planned.python_only
    buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, 4, MAX_LEN, PAGE, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graph buffers"):
        buffers.fill(planned, 2, geometry, step, state.pool, planned.max_decode_len)


def test_a_stream_longer_than_the_buffers_is_refused():
    geometry, table, requests = _batch(torch.Generator().manual_seed(4), ["plain"])
    requests = [(req_id, cache, 150, q_len) for req_id, cache, _, q_len in requests]  # 19 pages
    planned, step, state = _plan(geometry, table, requests, 1)
    buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, 4, 16 * PAGE, PAGE, torch.device("cpu"))  # 16 pages
    with pytest.raises(RuntimeError, match="longer than max_model_len"):
        buffers.fill(planned, 1, geometry, step, state.pool, planned.max_decode_len)


class _Base:
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        """vLLM's decision, first the graph mode (here: FULL unless forced eager); the kwargs for the test."""
        return ("NONE" if kwargs.get("force_eager") else "FULL"), kwargs


class _Runner(EvictionRunnerMixin, _Base):
    pass


@pytest.mark.parametrize("streams", [True, False])
def test_a_decode_batch_that_compresses_streams_runs_eagerly(streams):
    runner = _Runner()
    runner.kvc, runner.kvc_streams = WorkerState(), streams
    schedule = StreamSchedule(compress_at=80, budgets=(16,) * STREAMS, page=PAGE, block_size=BLOCK)
    runner.kvc.requests = {"a": RequestCache(schedule, length=79), "b": RequestCache(None, length=5)}

    def decide(most_tokens=1):
        return runner._determine_batch_execution_and_padding(num_tokens=2, max_num_scheduled_tokens=most_tokens)[1]

    assert "force_eager" not in decide()  # no step yet (a dummy run)
    runner.kvc.begin_step(["a", "b"])
    assert "force_eager" not in decide() and not runner.kvc.step.forced_eager
    runner.kvc.requests["a"].length = 80  # this step ends on a's compression point
    # A mixed batch runs its attention eagerly (PIECEWISE) anyway: it keeps its graphs.
    assert "force_eager" not in decide(most_tokens=8) and not runner.kvc.step.forced_eager
    forced = decide().get("force_eager", False)
    assert forced == streams == runner.kvc.step.forced_eager  # whole-row compactions run after the forward
    runner.kvc.begin_step(["a", "b"])
    runner.kvc.requests["a"].length = 81
    assert "force_eager" not in decide()
    # Decode steps of this engine by graph mode (a mixed batch and the dummy run are not counted)
    assert runner.kvc.decode_modes == ({"FULL": 2, "NONE": 1} if streams else {"FULL": 3})


def _ring_batch(generator, delayed: bool, count: int):
    """``count`` packed ring requests (DMS if ``delayed``, else KVzap's threshold rule)."""
    from vllm_kvcompress.eviction.threshold import ThresholdSchedule

    geometry = PoolGeometry(LAYERS, count * BLOCKS_EACH + 1, HEADS, BLOCK, PAGE)
    table = (torch.randperm(count * BLOCKS_EACH, generator=generator) + 1).view(count, BLOCKS_EACH).int()
    requests = []
    for r in range(count):
        schedule = ThresholdSchedule(compress_at=80, ring=16, streams=STREAMS, page=PAGE, block_size=BLOCK,
                                     threshold=0.0, delayed=delayed)
        cache = RequestCache(schedule)
        cache.kept = torch.randint(0, 30, (LAYERS, HEADS), generator=generator)
        schedule.pages_next = schedule.pages_for(cache.kept)
        cache.stream_table = stream_layout.packed_table(geometry, schedule.stream_rows(cache.kept).flatten(), table[r],
                                                        schedule)
        computed = 80 + int(torch.randint(0, 40, (1,), generator=generator))
        cache.length = computed + 1
        requests.append((f"r{r}", cache, computed, 1))
    return geometry, table, requests


@pytest.mark.parametrize("delayed", [True, False])
def test_ring_decodes_in_the_graph_buffers_do_what_their_plan_does(delayed):
    """DMS / KVzap ring decodes replayed from the buffers (padding rows included, earlier steps'
    rows left in them): the same attention, the same pool and scores after every layer (the
    leaving tokens moved, the decisions written), and the same survivor reports, which the
    step reads from the buffers' rows (a replay runs no Python)."""
    import copy

    from vllm_kvcompress.eviction.threshold import ThresholdRule

    generator = torch.Generator().manual_seed(5 + delayed)
    geometry, table, requests = _ring_batch(generator, delayed, 3)
    padded, dim = 5, 16
    rows = geometry.num_layers * geometry.num_blocks * HEADS * BLOCK
    kv = torch.randn(LAYERS, geometry.num_blocks, HEADS, BLOCK, 2 * dim, generator=generator)
    scores = torch.randn(rows, generator=generator)
    step_scores = [torch.randn(padded, HEADS, generator=generator) for _ in range(LAYERS)]
    query = torch.randn(padded, 2 * HEADS, dim, generator=generator)
    key, value = torch.randn(2, padded, HEADS, dim, generator=generator).unbind(0)
    method = SimpleNamespace(scorer=lambda: None, rule=lambda: ThresholdRule(0.0, 16, delayed=delayed))
    results = {}
    n = len(requests)
    for path in ("plan", "buffers"):
        tokens = padded if path == "buffers" else n  # a graph's batch is padded; an eager step is not
        planned, step, state = _plan(geometry, table, copy.deepcopy(requests), tokens)
        assert not planned.python_only
        state.pool.row_scores, state.pool.score_buffers = scores.clone(), step_scores
        meta = planned
        if path == "buffers":
            buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, 8, MAX_LEN, PAGE, torch.device("cpu"),
                                                        ring=True, delayed=delayed)
            for buffer in (buffers.victim_src, buffers.victim_dst, buffers.victim_kept, buffers.write_rows):
                buffer.fill_(3)  # an earlier step's rows
            meta = buffers.fill(planned, padded, geometry, step, state.pool, planned.max_decode_len)
            assert meta.victim_src.shape[1] == padded and meta.victim_src.data_ptr() == buffers.victim_src.data_ptr()
        cache, out = kv.clone(), torch.zeros(tokens, 2 * HEADS, dim)
        for layer in range(LAYERS):
            runner = stream_layout.StreamRunner(method, layer, LAYERS)
            runner.forward(query[:tokens], key[:tokens], value[:tokens], cache[layer], meta, out, 0.25)
        results[path] = (out[:n], cache, state.pool.row_scores,
                         step.settle_reports(), [state.requests[r].kept for r, *_ in requests])
    plan, replay = results["plan"], results["buffers"]
    torch.testing.assert_close(replay[0], plan[0])
    null_rows = BLOCK * HEADS  # block 0 of layer 0: where padding rows write
    assert torch.equal(replay[1].flatten(0, 3)[null_rows:], plan[1].flatten(0, 3)[null_rows:])
    assert torch.equal(replay[2][null_rows:], plan[2][null_rows:])
    assert replay[3] == plan[3] and len(plan[3]) == 3
    assert all(torch.equal(a, b) for a, b in zip(replay[4], plan[4]))


def test_a_dms_decode_in_vllms_layout_replays_unless_it_needs_a_mask():
    """A DMS request decoding before its prompt is packed (a prompt shorter than the window)
    sees every token (all are in the window), so its decode is plain and replays; a decode
    under the mask (a token older than the window, unpacked: a schedule the rule never makes)
    is built in Python and stays off the graphs. Once packed, decodes replay. On the GPU the
    test prompts of 41 and 129 tokens kept every DMS batch eager (31/31 steps, h200-eviction-14)."""
    from vllm_kvcompress.eviction.threshold import ThresholdRule, ThresholdSchedule

    runner = _Runner()
    runner.kvc, runner.kvc_streams = WorkerState(), True

    def forced(schedule, length):
        runner.kvc.requests = {"a": RequestCache(schedule, length=length)}
        runner.kvc.begin_step(["a"])
        return runner._determine_batch_execution_and_padding(num_tokens=1, max_num_scheduled_tokens=1)[1].get(
            "force_eager", False)

    for delayed in (True, False):
        rule = ThresholdRule(0.0, 64, delayed)
        short = rule.schedule(30, STREAMS, PAGE, BLOCK)  # packs at the window, 64
        assert not any(short.masks_decode(n) for n in range(31, 65))
        assert not forced(short, 31) and not forced(short, 65)  # in vLLM's layout; packed: a ring decode
        assert not any(rule.schedule(100, STREAMS, PAGE, BLOCK).masks_decode(n) for n in range(101, 130))
        unpacked_past_window = ThresholdSchedule(compress_at=128, ring=64, streams=STREAMS, page=PAGE,
                                                 block_size=BLOCK, threshold=0.0, delayed=delayed)
        assert forced(unpacked_past_window, 80) == delayed == unpacked_past_window.masks_decode(80)
