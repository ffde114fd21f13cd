"""TP=2 gives TP=1's tokens inside vLLM, for the methods whose state is per head.

vLLM splits query and KV heads over the ranks, and SmolLM2's 9/3 heads do not divide
by 2, so this runs SmolLM2 padded with one inert KV head (``smollm2-135m-gqa4``: the
new projections are zero, the model computes what SmolLM2 does) and SmolLM2's own
artefacts padded to match. fp32, so TP's different summation order stays far below
any token decision."""

import os

import pytest

from vllm_kvcompress.harness.padded_artefacts import pad_head_scores, pad_safetensors
from vllm_kvcompress.harness.generate import run_in_subprocess

pytestmark = pytest.mark.engine

ARTEFACTS = os.path.join(os.path.dirname(__file__), "..", "vllm_kvcompress", "artefacts")


@pytest.fixture(scope="module")
def padded_dir():
    from vllm_kvcompress.offline.models import ensure_padded_model

    return str(ensure_padded_model("smollm2-135m-gqa4"))


@pytest.fixture(scope="module")
def prompts(padded_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(padded_dir)
    return [long_document_ids(tokenizer, 300, offset=300 * i) for i in range(2)]


@pytest.fixture
def one_core_per_rank(monkeypatch):
    # vLLM's CPU workers bind one NUMA node each by default; this machine has one node.
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[-1]}")


def _settings(method, tmp_path):
    if method == "headkv":
        scores = pad_head_scores(os.path.join(ARTEFACTS, "head_scores", "smollm2-135m.json"), tmp_path / "s.json")
        return {"method": "headkv", "head_scores": scores, "max_kv_tokens": 160, "page_tokens": 32}
    if method == "dms":
        adapters = os.path.join(ARTEFACTS, "dms", "smollm2-135m", "dms-cr8.safetensors")
        return {"method": "dms", "dms_adapters": pad_safetensors(adapters, tmp_path / "dms.safetensors")}
    raise ValueError(method)


@pytest.mark.parametrize("method", ["headkv", "dms"])
def test_tp2_gives_the_tokens_of_tp1(padded_dir, prompts, method, tmp_path, one_core_per_rank):
    llm = dict(model=padded_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
               kv_cache_memory_bytes=96 << 20, attention_backend="kvcompress",
               additional_config={"kvcompress": _settings(method, tmp_path)})
    runs = {tp: run_in_subprocess({**llm, "tensor_parallel_size": tp}, prompts, max_tokens=32,
                                   ignore_eos=True) for tp in (1, 2)}
    gap = 0.0
    for one, two in zip(runs[1]["outputs"], runs[2]["outputs"], strict=True):
        assert two["token_ids"] == one["token_ids"]
        gap = max(gap, *(abs(a - b) for a, b in zip(one["token_logprobs"], two["token_logprobs"], strict=True)))
    assert gap < 1e-3
    assert "KVCompressImpl" in runs[2]["attention_impls"]
    print(f"{method}: TP=2 = TP=1 over {sum(len(o['token_ids']) for o in runs[1]['outputs'])} tokens, "
          f"largest logprob gap {gap:.2e}; wall {runs[1]['wall_s']:.0f} s (TP=1) / {runs[2]['wall_s']:.0f} s (TP=2)")
    if method == "dms":  # each rank records its own heads' survivors: eviction really ran on both
        kept = [record["kept_fraction"] for record in runs[2]["kept"]]
        assert {record["rank"] for record in runs[2]["kept"]} == {0, 1}
        assert len(kept) == 2 * len(prompts) and max(kept) < 0.9
        print(f"dms TP=2: kept fractions per rank and request {kept}")
