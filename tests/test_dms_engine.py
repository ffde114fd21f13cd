"""DMS inside vLLM on the real test model (the shipped SmolLM2 adapters, fp32):

* the engine's logprobs (compiled, the adapters scoring through the buffered custom op)
  are transformers' under the DMS mask with the same decisions
  (hard ``z > 0``, shift by one, window 128) over chunked prefill and decode: the
  decoder-layer hooks read the right residual stream and the prompt attends under the
  mask before it is packed;
* the survivors the worker reports are the tokens transformers' decisions keep, and the
  blocks the scheduler holds follow them (preemption and recompute of the threshold
  layout are tested with KVzap, which shares it: ``test_kvzap_engine.py``)."""

import os
from pathlib import Path

import pytest
import torch

from vllm_kvcompress.eviction.streams import cdiv
from vllm_kvcompress.harness.step_trace import run_traced

pytestmark = pytest.mark.engine

BLOCK, PAGE_ROWS, PAGES_PER_BLOCK = 128, 16, 30 * 3 * 128 // 16
POOL_BLOCK = 30 * 3 * BLOCK * 256 * 2  # SmolLM2-135M: bytes of one block over all layers, fp32 K+V
ADAPTERS = Path(os.environ.get("KVCOMPRESS_TEST_DMS", Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts"
                               / "dms" / "smollm2-135m" / "dms-cr8.safetensors"))


def _llm(model_dir, blocks=32, chunk=256, eager=True):  # 256-token chunks: the prompt's DMS mask spans a chunk boundary
    return dict(model=model_dir, dtype="float32", max_model_len=min(2048, blocks * BLOCK), enforce_eager=eager,
                kv_cache_memory_bytes=(blocks + 1) * POOL_BLOCK, attention_backend="kvcompress",
                max_num_batched_tokens=chunk,
                additional_config={"kvcompress": {"method": "dms", "dms_adapters": str(ADAPTERS)}})


def _reference(model_dir, sequences):
    """Transformers' logprobs of each sequence under the DMS mask, and its decisions."""
    from vllm_kvcompress.offline.dms_train import DMSRetrofit
    from vllm_kvcompress.methods.dms.checkpoint import load_decisions
    from vllm_kvcompress.offline.models import load_eager

    _, model = load_eager(model_dir)
    decisions = load_decisions(str(ADAPTERS), 30, 576, 3)
    retrofit = DMSRetrofit(model, decisions.window, hard=True)
    retrofit.adapters = torch.nn.ModuleList(decisions.adapters)
    retrofit.active = True
    out = []
    for ids in sequences:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        marked = torch.stack([retrofit.marked[i] for i in range(30)])  # [L, H, T]
        out.append((logprobs, marked))
    return out, decisions.window


def test_dms_engine_is_transformers_under_the_dms_mask(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [long_document_ids(tokenizer, 400, offset=900 * i) for i in range(2)]
    # Compiled (no --enforce-eager, as users serve it): the adapters score through the custom op
    # into buffers; a compiled graph that skipped the hooks would leave the scores at 0, which
    # keeps every token (other pages).
    trace = run_traced(_llm(smollm2_dir, eager=False), prompts, max_tokens=100)
    outputs = [o["token_ids"] for o in trace["outputs"]]
    reference, window = _reference(smollm2_dir, [p + o for p, o in zip(prompts, outputs)])

    gaps, page_diffs = [], []
    for i, (prompt, out) in enumerate(zip(prompts, trace["outputs"])):
        logprobs, marked = reference[i]
        ids = torch.tensor(prompt + out["token_ids"])
        ref = logprobs[len(prompt) - 1:-1].gather(1, ids[len(prompt):, None])[:, 0]
        gaps.append(float((ref - torch.tensor(out["token_logprobs"], dtype=torch.float64)).abs().max()))
        kept = (~marked).cumsum(-1)  # [L, H, T]: unmarked among the first n tokens
        for step in trace["steps"]:
            if str(i) in step["pages_next"]:
                computed = step["computed"][str(i)]
                want = sum(cdiv(window + int(k) + 1, PAGE_ROWS) for k in kept[..., computed - window - 1].flatten())
                page_diffs.append(step["pages_next"][str(i)] - want)
    steps = [s for s in trace["steps"] if "0" in s["pages_next"]]
    held = [(s["blocks"]["0"], prev["pages_next"]["0"]) for prev, s in zip(steps, steps[1:])]
    marked_fraction = float(reference[0][1][..., : len(prompts[0]) - window].float().mean())

    native, packed = cdiv(len(prompts[0]), BLOCK), held[0][0]
    print(f"DMS ({ADAPTERS.name}, window {window}): {marked_fraction:.2f} of the prompt's tokens before the window "
          f"marked; logprob gap vs transformers under the DMS mask {max(gaps):.2e}; reported pages = transformers' "
          f"decisions at {sum(d == 0 for d in page_diffs)}/{len(page_diffs)} steps (differences "
          f"{sorted(set(page_diffs))}); blocks {native} -> {packed} -> {steps[-1]['blocks']['0']}")
    assert max(gaps) < 1e-3 and marked_fraction > 0.3
    assert all(abs(d) <= 2 for d in page_diffs) and sum(d != 0 for d in page_diffs) <= len(page_diffs) // 20
    assert all(blocks == cdiv(pages, PAGES_PER_BLOCK) for blocks, pages in held), held
    assert packed < native and len(steps) >= 99


def test_dms_single_neuron_checkpoint_is_transformers_with_the_query_channel(smollm2_dir, tmp_path):
    """An official single-neuron checkpoint decides from the served model's own query (the
    last channel of each GQA group's first head, pre-RoPE, then zeroed before and after
    RoPE). SmolLM2 was not trained for it, which does not matter for the mechanics: the
    engine must reproduce transformers under the same rule."""
    import json

    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.dms_train import DMSRetrofit
    from vllm_kvcompress.offline.models import load_eager
    from vllm_kvcompress.offline.prompts import long_document_ids

    folder = tmp_path / "single-neuron"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 30, "hidden_size": 576, "num_key_value_heads": 3, "dms_separate_alpha": False,
        "dms_window_size": 128, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0}))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt, short = long_document_ids(tokenizer, 300), long_document_ids(tokenizer, 200, offset=900)
    llm = _llm(smollm2_dir)
    llm["additional_config"]["kvcompress"]["dms_adapters"] = str(folder)
    # The second request packs its prompt and finishes in the same step (one token): its
    # report must not divide by the worker's computed-token count, still 0 then (it once
    # crashed the engine). The third, a 60-token prompt, packs at the window (128 tokens)
    # during decode: ring + spare row need a second block (it once crashed the engine too).
    tiny, tiny_next = long_document_ids(tokenizer, 60, offset=1500), long_document_ids(tokenizer, 90, offset=2100)
    trace = run_traced(llm, [prompt, short, tiny], max_tokens=40, forced=[None, short[:1], tiny_next])
    out = trace["outputs"][0]
    assert len(trace["outputs"][1]["token_ids"]) == 1 and len(trace["outputs"][2]["token_ids"]) == 90

    _, model = load_eager(smollm2_dir)
    retrofit = DMSRetrofit(model, 128, hard=True, query_channel=(100.0, 5.0))
    retrofit.active = True
    ids = torch.tensor(prompt + out["token_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    ref = logprobs[len(prompt) - 1:-1].gather(1, ids[len(prompt):, None])[:, 0]
    gap = float((ref - torch.tensor(out["token_logprobs"], dtype=torch.float64)).abs().max())
    marked = torch.stack([retrofit.marked[i] for i in range(30)])[..., : len(prompt) - 128].float().mean()
    pages = [s["pages_next"]["0"] for s in trace["steps"] if "0" in s["pages_next"]]
    print(f"DMS single-neuron (SmolLM2's own query channel, window 128): {float(marked):.2f} of the prompt's tokens "
          f"before the window marked; logprob gap vs transformers {gap:.2e}; pages {pages[0]} -> {pages[-1]} "
          f"(native {90 * cdiv(len(prompt) + 40, PAGE_ROWS)})")
    assert gap < 1e-3 and 0.05 < float(marked) < 0.95 and len(pages) >= 39

