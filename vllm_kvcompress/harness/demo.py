"""`make demo`: the same prompts through vLLM's default CPU backend and through
kvcompress, printing both generations and each engine's own KV-capacity line.

    python -m vllm_kvcompress.harness.demo [--model smollm2-135m] [--max-tokens 48] [--additional-config JSON]

Default kvcompress settings: method ``kvquant`` with 8-bit pre-RoPE keys and int8 values
(the model's shipped key ranges; about 2x the tokens in the same memory), the configuration
that kept bf16's answers best on these prompts (``benchmarks.demo_agreement``: LOOKAT with
16 codes per key, the demo's earlier default, turned every answer into noise on SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap

from vllm_kvcompress.harness.equivalence import first_divergences
from vllm_kvcompress.offline.models import MODELS, ensure_model
from vllm_kvcompress.offline.prompts import SHORT_QUESTIONS, chat_ids, long_document_ids
from vllm_kvcompress.harness.generate import run_in_subprocess

CAPACITY_LINE = re.compile(r"(?:CPU|GPU)? ?KV cache size: [\d,]+ tokens.*")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--additional-config", default=None,
                        help='default: {"kvcompress": {"method": "kvquant", "key_ranges": <shipped>, "key_bits": 8, '
                             '"value_bits": 8}}')
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = str(ensure_model(args.model))
    if args.additional_config is None:
        from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

        ranges = ensure_key_ranges(args.model)  # shipped for the project's models, else made once (~1 min)
        args.additional_config = json.dumps({"kvcompress": {"method": "kvquant", "key_ranges": str(ranges),
                                                            "key_bits": 8, "value_bits": 8}})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [chat_ids(tokenizer, q) for q in SHORT_QUESTIONS[:3]]
    prompts.append(long_document_ids(tokenizer, 2048))
    base = dict(model=model_dir, dtype="bfloat16", max_model_len=4096, enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    runs = {}
    for label, extra in (
        ("vLLM default", {}),
        ("kvcompress", {"attention_backend": "kvcompress", "additional_config": json.loads(args.additional_config)}),
    ):
        print(f"[demo] generating with {label} ...", flush=True)
        runs[label] = run_in_subprocess({**base, **extra}, prompts, max_tokens=args.max_tokens)

    divergences = {
        d.prompt: d for d in first_divergences(runs["vLLM default"]["outputs"], runs["kvcompress"]["outputs"])
    }
    for i, ids in enumerate(prompts):
        shown = tokenizer.decode(ids[-60:]).replace("\n", " ")
        print(f"\n=== prompt {i} ({len(ids)} tokens): ...{shown[-90:]}")
        for label, result in runs.items():
            text = result["outputs"][i]["text"].strip().replace("\n", " ")
            print(f"--- {label:13s}| " + textwrap.shorten(text, 200))
        d = divergences.get(i)
        if d is None:
            print("    identical tokens")
        elif d.is_near_tie:
            print(f"    same up to token {d.step}, then a rounding tie went the other way ({d.explain()})")
        else:
            print(f"    same up to token {d.step}, then a different answer ({d.explain()})")
    print("\n=== KV capacity (the engine's own log line)")
    for label, result in runs.items():
        match = CAPACITY_LINE.search(result["log"])
        print(f"{label:13s}: {match.group(0) if match else 'capacity line not found'}  [impl: {', '.join(result['attention_impls'])}]")


if __name__ == "__main__":
    main()
