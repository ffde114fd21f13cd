"""`make demo`: the same prompts through vLLM's default CPU backend and through
kvcompress, printing both generations and each engine's own KV-capacity line.

    python -m vllm_kvcompress.harness.demo [--model smollm2-135m] [--max-tokens 48] [--additional-config JSON]

Default kvcompress settings: the ``balanced`` preset (docs/presets.md): rows of 8-bit
pre-RoPE keys and int8 values (the model's shipped key ranges; 1.9x the tokens in the same
memory) under SnapKV eviction of 80% of every prompt past 512 tokens. The three chat
questions keep every token in compact rows; the 2,048-token document is compressed to 512
tokens at its end, about 7.7x less KV memory than bf16 for it.
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
                        help='default: {"kvcompress": {"preset": "balanced"}}')
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = str(ensure_model(args.model))
    if args.additional_config is None:
        from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

        ranges = ensure_key_ranges(args.model)  # shipped for the project's models, else made once (~1 min)
        preset = {"preset": "balanced"}
        if args.model not in ("smollm2-135m", "qwen2.5-coder-0.5b"):
            preset["key_ranges"] = str(ranges)
        args.additional_config = json.dumps({"kvcompress": preset})
    settings = json.loads(args.additional_config)
    if "preset" in settings.get("kvcompress", {}):
        from vllm_kvcompress.presets import expand

        print(f"[demo] kvcompress preset {settings['kvcompress']['preset']!r} on {args.model}: "
              f"{expand(settings['kvcompress'], _hf_config(model_dir))}", flush=True)
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
    print("\n=== KV capacity (the engine's own log line; eviction comes on top of it for prompts past "
          "min_kv_tokens)")
    for label, result in runs.items():
        match = CAPACITY_LINE.search(result["log"])
        print(f"{label:13s}: {match.group(0) if match else 'capacity line not found'}  [impl: {', '.join(result['attention_impls'])}]")


def _hf_config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
