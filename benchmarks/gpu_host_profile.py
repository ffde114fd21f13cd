"""Where the host's time goes while a config decodes: the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) under cProfile, for the decode steps of a batch of
prompts (a first generate, unprofiled, fills the batch's prompts into the prefix cache so the
profiled one spends its time decoding). A GPU-side profile (``gpu_engine --profile``) says what
the kernels cost; this says what the Python around them costs, which decides a step's time
whenever the host, not the GPU, is the limit (eager engines, per-step planning). Only the
decode steps are profiled and timed one by one (steps with no request waiting and every running
one past its prompt): a short run's prefill planning would otherwise fill the profile.

    python3 -m benchmarks.gpu_host_profile --config kvzap-4x --batch 64 --context 1024 --tokens 32 --out DIR

Writes ``DIR/host-<config>.txt`` (top functions by cumulative and by own time) and prints the
wall time per decode step beside it: the profiled steps' median and an unprofiled run less the
prefill-only one."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

from benchmarks.gpu_engine import CONFIGS, SEED_DECODE_HEAVY, WORKLOADS, _prompts, apply_config_env, engine_kwargs


def profile(name: str, batch: int, context: int, tokens: int, utilization: float, top: int = 45) -> tuple[str, dict]:
    from vllm import LLM, SamplingParams

    apply_config_env(name, os.environ)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = LLM(**engine_kwargs(name, WORKLOADS["quick"], utilization))
    prompts = _prompts(batch, context, SEED_DECODE_HEAVY)

    def generate(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started

    prefill_s = generate(1)  # also the warm-up; the later runs find these prompts cached where caching is on
    plain_s = generate(tokens + 1)
    # Only the engine's decode steps are profiled (and timed one by one): the prefill's
    # planning and packing would otherwise dominate the profile of a short run.
    core = llm.llm_engine.engine_core.engine_core
    profiler, step_fn, decode_steps = cProfile.Profile(), core.step_fn, []

    def decoding() -> bool:
        scheduler = core.scheduler
        return not scheduler.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running)

    def step():
        if not decoding():
            return step_fn()
        started = time.perf_counter()
        profiler.enable()
        try:
            return step_fn()
        finally:
            profiler.disable()
            decode_steps.append(time.perf_counter() - started)

    core.step_fn = step
    total_s = generate(tokens + 1)
    core.step_fn = step_fn
    steady = sorted(decode_steps)[: max(1, len(decode_steps) - 2)]  # the slowest two hold the batch's last outputs
    facts = {"config": name, "batch": batch, "context": context, "tokens": tokens,
             "prefill_s": round(prefill_s, 3), "unprofiled_s": round(plain_s, 3), "profiled_s": round(total_s, 3),
             "ms_per_decode_step": round(1000 * (plain_s - prefill_s) / tokens, 2),
             "profiled_decode_steps": len(decode_steps),
             "profiled_ms_per_decode_step_median": round(1000 * sorted(decode_steps)[len(decode_steps) // 2], 2)
             if decode_steps else None,
             "profiled_ms_per_decode_step_mean": round(1000 * sum(steady) / len(steady), 2) if decode_steps else None}
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        text.write(f"\n===== by {order} =====\n")
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(top)
    return text.getvalue(), facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for option, value in (("--batch", args.batch), ("--context", args.context), ("--tokens", args.tokens)):
        if value < 1:
            parser.error(f"{option} must be at least 1 (got {value})")
    text, facts = profile(args.config, args.batch, args.context, args.tokens, args.gpu_memory_utilization)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host-{args.config}.txt"
    path.write_text(f"{facts}\n{text}")
    print(facts)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
