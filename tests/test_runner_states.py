"""The eviction runner mixin's per-request state across vLLM's ``_update_states``
(``vllm_kvcompress.vllm.runner``), with vLLM's runner replaced by a stub: no model runs."""

from types import SimpleNamespace

from vllm_kvcompress.vllm.runner import EvictionRunnerMixin
from vllm_kvcompress.vllm.state import RequestCache, WorkerState


class _VllmRunner:
    def _update_states(self, scheduler_output):
        return "vllm"


class _Runner(EvictionRunnerMixin, _VllmRunner):
    def __init__(self):
        self.kvc = WorkerState()
        self.kvc_policy = SimpleNamespace(schedule_for=lambda prompt_len, extra: ("schedule", prompt_len))
        self.kvc_method = SimpleNamespace(masks=False)
        self.requests = {}
        table = SimpleNamespace(get_cpu_tensor=lambda: "host table")
        self.input_batch = SimpleNamespace(req_ids=["a"], block_table=[table])


def _output(new=(), finished=()):
    cached = SimpleNamespace(req_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, sampling_params=None, prompt_token_ids=[1] * 700) for r in new],
        scheduled_cached_reqs=cached, finished_req_ids=set(finished), num_scheduled_tokens={})


def test_a_finished_id_scheduled_again_as_new_keeps_its_new_cache():
    """vLLM may finish a request and schedule the same id as a new one in one step: the new
    request's cache must survive (dropping it would leave the worker writing logical slots
    into blocks the scheduler has cut)."""
    runner = _Runner()
    runner.kvc.requests["a"] = old = RequestCache(("schedule", 300), length=310)
    assert runner._update_states(_output(new=["a"], finished=["a"])) == "vllm"
    cache = runner.kvc.requests["a"]
    assert cache is not old and cache.schedule == ("schedule", 700)
    assert runner.kvc.step.caches == [cache] and runner.kvc.step.host_block_table == "host table"


def test_finished_requests_are_dropped():
    runner = _Runner()
    runner.kvc.requests["b"] = RequestCache(("schedule", 300))
    runner._update_states(_output(finished=["b"]))
    assert "b" not in runner.kvc.requests
