"""Do the methods keep the model's answers? The demo's prompts (three chat questions and a
2,048-token document to summarise) through vLLM's default CPU backend and through kvcompress
with each configuration, greedy: where each run first differs from vLLM's, whether that is a
near tie (rounding; :mod:`vllm_kvcompress.harness.equivalence`) or a real change, and the
engine's own KV-capacity line (issue 24, item 4).

    python -m benchmarks.demo_agreement --model smollm2-135m \\
        --configs kvcompress-none,lookat-m16-v8,kvquant-k4-v8,dms-cr4 --out results/DATE/demo-agreement/smollm2-135m

Config names are :mod:`benchmarks.configs`' (e.g. ``kvcompress-none``, ``lookat-m32-v8``,
``kvquant-k4-v8``, ``dms-cr4``, ``knorm-r0.5``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.configs import NAMES_HELP, resolve


def agreement(reference: list[dict], candidate: list[dict]) -> dict:
    from vllm_kvcompress.harness.equivalence import first_divergences

    divergences = {d.prompt: d for d in first_divergences(reference, candidate)}
    prompts = []
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        d = divergences.get(i)
        prompts.append({"identical": d is None, "first_difference": None if d is None else d.step,
                        "near_tie": None if d is None else d.is_near_tie,
                        "gap_moved": None if d is None else d.gap_shift, "text": cand["text"]})
    same = sum(len(r["token_ids"]) if p["identical"] else p["first_difference"] for r, p in zip(reference, prompts))
    return {"prompts": prompts, "identical": sum(p["identical"] for p in prompts),
            "near_ties": sum(bool(p["near_tie"]) for p in prompts),
            "changed": sum(p["near_tie"] is False for p in prompts),
            "tokens_before_difference": same, "tokens": sum(len(r["token_ids"]) for r in reference)}


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.harness.demo import CAPACITY_LINE
    from vllm_kvcompress.harness.generate import run_in_subprocess
    from vllm_kvcompress.offline.models import MODELS, ensure_model
    from vllm_kvcompress.offline.prompts import SHORT_QUESTIONS, chat_ids, long_document_ids

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--configs", default="kvcompress-none,lookat-m16-v8,lookat-m32-v8,kvquant-k8-v8,kvquant-k4-v8,"
                                             "kvquant-k4-v4,dms-cr4", help=NAMES_HELP)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    configs = {name: resolve(name, args.model) for name in names}  # unknown names refused before any run
    unknown = [name for name, kwargs in configs.items() if kwargs is None or name == "bf16"]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; names: {NAMES_HELP}")
    model_dir = str(ensure_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [chat_ids(tokenizer, q) for q in SHORT_QUESTIONS[:3]] + [long_document_ids(tokenizer, 2048)]
    base = dict(model=model_dir, dtype="bfloat16", max_model_len=4096, enforce_eager=True,
                kv_cache_memory_bytes=1 << 30)

    def capacity(log: str) -> str:
        match = CAPACITY_LINE.search(log)
        return match.group(0).strip() if match else "not found"

    started = time.time()
    print("[demo_agreement] vLLM default ...", file=sys.stderr, flush=True)
    reference = run_in_subprocess(base, prompts, max_tokens=args.max_tokens)
    rows = [{"config": "vLLM default", "capacity": capacity(reference["log"]),
             "texts": [o["text"] for o in reference["outputs"]]}]
    for i, name in enumerate(names, 1):
        print(f"[demo_agreement] {i}/{len(names)} {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        run = run_in_subprocess({**base, **configs[name]}, prompts, max_tokens=args.max_tokens)
        rows.append({"config": name, "llm": configs[name], "capacity": capacity(run["log"]),
                     "wall_s": round(time.time() - t, 1), **agreement(reference["outputs"], run["outputs"])})
    result = {"model": args.model, "max_tokens": args.max_tokens, "date": time.strftime("%Y-%m-%d"),
              "prompts": [tokenizer.decode(p[-40:]) for p in prompts], "rows": rows,
              "command": "python -m benchmarks.demo_agreement " + " ".join(sys.argv[1:] if argv is None else argv),
              "total_s": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Demo prompts: kvcompress against vLLM's default backend ({args.model}, greedy, "
             f"{args.max_tokens} tokens)", "", f"`{result['command']}` ({result['date']}, 2-core CPU).", "",
             "Per config: prompts with identical tokens, first differences at a near tie (rounding: each run "
             "prefers its own token, gap moved <= 0.5 nats) and real changes; tokens equal before each "
             "prompt's first difference; the engine's own capacity line.", "",
             "| config | identical | near tie | changed | tokens equal | capacity line |", "|---|---|---|---|---|---|"]
    for row in rows[1:]:
        lines.append(f"| {row['config']} | {row['identical']}/4 | {row['near_ties']} | {row['changed']} | "
                     f"{row['tokens_before_difference']}/{row['tokens']} | {row['capacity']} |")
    lines += ["", f"vLLM default: {rows[0]['capacity']}", "", "## Answers (first 120 characters)", ""]
    for p, prompt in enumerate(result["prompts"]):
        lines += [f"### prompt {p}: ...{prompt[-80:]!r}", "", f"- vLLM default: {rows[0]['texts'][p].strip()[:120]!r}"]
        for row in rows[1:]:
            info = row["prompts"][p]
            tag = "identical" if info["identical"] else (
                f"step {info['first_difference']}, " + ("near tie" if info["near_tie"] else "changed"))
            lines.append(f"- {row['config']} ({tag}): {info['text'].strip()[:120]!r}")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines[:len(rows) + 8]))
    return result


if __name__ == "__main__":
    main()
