"""KVzap's cost per engine step: the predictor's time and the whole step, vs method none.

    python -m benchmarks.kvzap_overhead --model smollm2-135m --batch 8 --prompt 1000 --tokens 64 --out DIR

Each configuration runs in its own interpreter with the engine core and the worker in
that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one rank), so the step loop is timed
directly and the predictor hooks' own time is read from the worker
(``WorkerState.predictor_seconds``, through ``collective_rpc``). Decode steps only (every request generating), after a
warm-up. Same machine, same prompts, one run: the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

PREDICTORS = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / "kvzap"


def _predictor_seconds(worker) -> float:
    state = getattr(worker.model_runner, "kvc", None)
    return 0.0 if state is None else state.predictor_seconds


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["llm"])

    def predictor_seconds() -> float:
        return sum(llm.collective_rpc(_predictor_seconds))

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=spec["tokens"], ignore_eos=True, temperature=0.0)
    for i, ids in enumerate(spec["prompts"]):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    decode_steps, predictor_s = [], []
    scheduler = engine.engine_core.engine_core.scheduler
    while engine.has_unfinished_requests():
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running) and \
            len(scheduler.running) == len(spec["prompts"]) and not scheduler.waiting
        before, started = predictor_seconds(), time.perf_counter()
        engine.step()
        if decoding:
            decode_steps.append(time.perf_counter() - started)
            predictor_s.append(predictor_seconds() - before)
    warm = spec["warmup"]
    return {"step_s": decode_steps[warm:], "predictor_s": predictor_s[warm:]}


def _configs(model: str, threshold: float) -> dict[str, dict]:
    files = PREDICTORS / model
    kvzap = lambda kind: {"method": "kvzap", "kvzap_threshold": threshold,  # noqa: E731
                          "kvzap_predictor": str(files / f"kvzap-{kind}.safetensors")}
    return {"none": {"method": "none"}, "kvzap-linear": kvzap("linear"), "kvzap-mlp": kvzap("mlp")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=-4.0)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--pool-gib", type=int, default=2, help="KV pool size")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    from transformers import AutoTokenizer

    from benchmarks.capacity import environment
    from vllm_kvcompress.offline.models import ensure_model
    from vllm_kvcompress.offline.prompts import long_document_ids
    from vllm_kvcompress.harness.subprocess_run import run_module

    model_dir = str(ensure_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [long_document_ids(tokenizer, args.prompt, offset=200 * i) for i in range(args.batch)]
    results = {}
    for name, settings in _configs(args.model, args.threshold).items():
        llm = dict(model=model_dir, dtype="bfloat16", max_model_len=args.prompt + args.tokens + 8, enforce_eager=True,
                   attention_backend="kvcompress", additional_config={"kvcompress": settings},
                   max_num_seqs=args.batch, kv_cache_memory_bytes=args.pool_gib << 30)
        print(f"[{name}] {args.batch} x {args.prompt}-token prompts, {args.tokens} tokens each ...", flush=True)
        out = run_module("benchmarks.kvzap_overhead", {"llm": llm, "prompts": prompts, "tokens": args.tokens,
                                                       "warmup": args.warmup}, timeout=1800)
        results[name] = {"settings": settings, "step_ms": 1e3 * statistics.median(out["step_s"]),
                         "predictor_ms": 1e3 * statistics.median(out["predictor_s"]), "steps": len(out["step_s"])}
    base, env = results["none"]["step_ms"], environment()
    lines = [f"# KVzap overhead per decode step ({env['date']})", "",
             f"- command: `python -m benchmarks.kvzap_overhead {' '.join(argv or [])}`".rstrip(),
             f"- model {args.model}, bf16, batch {args.batch} x {args.prompt}-token prompts, {args.tokens} tokens; "
             f"threshold {args.threshold}; median over decode steps after {args.warmup} warm-up steps",
             f"- hardware: {env['hardware']}; vLLM {env['vllm']}", "",
             "| config | step (ms) | step / none | predictor (ms) | predictor / none step |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / base:.3f} | {r['predictor_ms']:.2f} | "
                     f"{r['predictor_ms'] / base:.4f} |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].endswith(".json"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm_kvcompress.harness.subprocess_run import tool_main

        tool_main(run)
    else:
        main()
