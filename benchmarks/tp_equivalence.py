"""Tensor parallelism on CPU: every method at TP=2 against TP=1, same prompts, fp32.

    python -m benchmarks.tp_equivalence --model smollm2-135m-gqa4 --out DIR
    python -m benchmarks.tp_equivalence --model qwen2.5-coder-0.5b --out DIR
    python -m benchmarks.tp_equivalence --candidate compiled --methods none,knorm,headkv --out DIR

``--candidate compiled`` compares instead a compiled engine (``enforce_eager=False``:
torch.compile of the model, the attention an opaque op) with the eager one, at TP=1;
a method refused in that mode (e.g. a single-neuron DMS checkpoint) is reported as refused.

``smollm2-135m-gqa4`` is SmolLM2 with one inert KV head added (its 9/3 heads do not split
over 2 ranks; see ``vllm_kvcompress.offline.models.ensure_padded_model``), run with SmolLM2's
artefacts padded to match. Qwen2.5-Coder-0.5B (14 query / 2 KV heads) splits as is and
uses its shipped artefacts. Each engine binds one core per rank
(``VLLM_CPU_OMP_THREADS_BIND``). Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ARTEFACTS = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts"
METHODS = ("none", "knorm", "snapkv", "lookat", "lookat-exact", "headkv", "kvzap", "dms")
# Why a row may differ for reasons that are not the candidate's (printed under the table).
NOTES = {
    "lookat": "LOOKAT with `current_tokens: coded` (the default) re-reads every prompt token from its PQ "
              "codes: a key within rounding of a centroid boundary takes another code, and the flip cascades "
              "through the later layers, so a change of rounding (here TP's split matmuls) changes the tokens. "
              "`lookat-exact` (prompt attended exactly, decode from the codes) isolates the per-rank slicing.",
}


def settings_for(method: str, model: str, work: Path) -> dict:
    from vllm_kvcompress.offline.calibrate import ensure_codebooks
    from vllm_kvcompress.harness.padded_artefacts import pad_head_scores, pad_safetensors

    padded = model == "smollm2-135m-gqa4"
    base = "smollm2-135m" if padded else model

    def artefact(path: Path) -> str:
        if not padded:
            return str(path)
        out = work / f"{method}-{path.name}"
        return pad_head_scores(path, out) if path.suffix == ".json" else pad_safetensors(path, out)

    if method == "none":
        return {"method": "none"}
    if method == "knorm":
        return {"method": "knorm", "max_kv_tokens": 128}
    if method == "snapkv":
        return {"method": "snapkv", "compression_ratio": 0.5}
    if method in ("lookat", "lookat-exact"):
        codebooks = artefact(Path(ensure_codebooks(base, 8, k=16, tokens=512, iters=3)))
        return {"method": "lookat", "codebooks": codebooks,
                "current_tokens": "exact" if method == "lookat-exact" else "coded"}
    if method == "headkv":
        return {"method": "headkv", "head_scores": artefact(ARTEFACTS / "head_scores" / f"{base}.json"),
                "max_kv_tokens": 160, "page_tokens": 32}
    if method == "kvzap":
        return {"method": "kvzap", "kvzap_threshold": -4.0,
                "kvzap_predictor": artefact(ARTEFACTS / "kvzap" / base / "kvzap-linear.safetensors")}
    if method == "dms":
        return {"method": "dms", "dms_adapters": artefact(ARTEFACTS / "dms" / base / "dms-cr8.safetensors")}
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def compare(one: dict, two: dict) -> dict:
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(one["outputs"], two["outputs"], strict=True))
    gaps = [abs(x - y) for a, b in zip(one["outputs"], two["outputs"])
            for x, y in zip(a["token_logprobs"], b["token_logprobs"])]
    return {"same_tokens": same, "prompts": len(one["outputs"]), "max_logprob_gap": max(gaps),
            "tokens": sum(len(o["token_ids"]) for o in one["outputs"]),
            "wall_reference_s": round(one["wall_s"], 1), "wall_candidate_s": round(two["wall_s"], 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-gqa4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--prompt-tokens", type=int, default=330)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--candidate", choices=("tp2", "compiled"), default="tp2")
    parser.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.models import ensure_any
    from vllm_kvcompress.offline.prompts import long_document_ids
    from vllm_kvcompress.harness.generate import run_in_subprocess

    model_dir = str(ensure_any(args.model))
    out = Path(args.out)
    (out / "artefacts").mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [long_document_ids(tokenizer, args.prompt_tokens, offset=300 * i) for i in range(2)]
    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}|{cpus[-1]}"
    rows = {}
    methods = args.methods.split(",")
    candidate = {"tp2": {"tensor_parallel_size": 2}, "compiled": {"enforce_eager": False}}[args.candidate]
    for method in tqdm(methods, desc=f"reference vs {args.candidate}", unit="method", file=sys.stderr):
        llm = dict(model=model_dir, dtype="float32", max_model_len=2048, enforce_eager=True,
                   kv_cache_memory_bytes=256 << 20, attention_backend="kvcompress",
                   additional_config={"kvcompress": settings_for(method, args.model, out / "artefacts")})
        try:
            runs = [run_in_subprocess({**llm, **variant}, prompts, max_tokens=args.max_tokens, ignore_eos=True)
                    for variant in ({}, candidate)]
        except RuntimeError as exc:  # a refused combination is a result, not a crash
            from vllm_kvcompress.harness.subprocess_run import failure_reason

            rows[method] = {"refused": failure_reason(str(exc))}
            print(f"{method}: refused: {rows[method]['refused']}", file=sys.stderr)
            continue
        rows[method] = compare(*runs)
        print(f"{method}: {rows[method]}", file=sys.stderr)
    meta = {"model": args.model, "candidate": args.candidate, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.tp_equivalence " + " ".join(argv)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    title = {"tp2": "TP=2 vs TP=1", "compiled": "compiled (torch.compile) vs eager, TP=1"}[args.candidate]
    lines = [f"# {title} on CPU: {args.model}", "",
             f"{meta['date']}; `{meta['command']}`. fp32, 2 prompts of {args.prompt_tokens} tokens, "
             f"{args.max_tokens} greedy tokens each (ignore EOS).", "",
             "| method | same tokens | max logprob gap | reference wall s | candidate wall s |", "|---|---|---|---|---|"]
    for method, r in rows.items():
        if "refused" in r:
            lines.append(f"| {method} | refused: {r['refused']} | | | |")
            continue
        lines.append(f"| {method} | {r['same_tokens']}/{r['prompts']} | {r['max_logprob_gap']:.1e} | "
                     f"{r['wall_reference_s']} | {r['wall_candidate_s']} |")
    lines += [""] + [f"{method}: {NOTES[method]}" for method in rows if method in NOTES]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(r.get("same_tokens") != r.get("prompts") for m, r in rows.items() if "refused" not in r and m not in NOTES):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
