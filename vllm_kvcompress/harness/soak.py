"""Soak test of ``vllm serve`` on 127.0.0.1: mixed traffic for a fixed time, then checks.

A fixed, seeded job list is played by ``concurrency`` client threads (job ``i`` is the
same in every run, so two servers get the same load):

* ``complete``: a streamed completion of a mixed-length prompt, timed (TTFT, latency);
  with ``per_request_settings`` (an eviction server) one in five asks to keep every
  token (``kvcompress_compression_ratio: 0``), so compressed and full requests share the
  pool - the bf16 baseline gets the same requests without the setting;
* ``disconnect``: a stream the client drops after a few chunks (vLLM aborts it);
* ``give_up``: a client that times out before the first token and hangs up;
* ``hostile``: per-request kvcompress settings of a wrong type or range, or an unknown
  key, through ``vllm_xargs`` (must get HTTP 400 naming kvcompress; an eviction server
  must also name the setting).

Around the load a *control* request (greedy) runs alone before and after; its text must
not change. After the load every request must have left the scheduler and vLLM's
``kv_cache_usage_perc`` must be 0 (no block leaked), read after the control request so
that the engine has stepped since the last abort.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

HOSTILE = (  # (vllm_xargs, words the 400 message must contain)
    ({"kvcompress_compression_ratio": "lots"}, "compression_ratio"),
    ({"kvcompress_compression_ratio": 7.5}, "0 <= r < 1"),
    ({"kvcompress_max_kv_tokens": -1}, "max_kv_tokens"),
    ({"kvcompress_budget": 64}, "unknown setting"),
    ({"kvcompress": "half"}, "must be an object"),
)


@dataclass
class SoakSpec:
    duration_s: float = 60.0
    concurrency: int = 4
    prompt_tokens: tuple[int, ...] = (48, 300, 900, 1500)
    max_tokens: tuple[int, ...] = (8, 32, 160)
    mix: dict[str, float] = field(default_factory=lambda: {"complete": 0.7, "disconnect": 0.12, "give_up": 0.08,
                                                           "hostile": 0.10})
    control_tokens: int = 32
    seed: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags(llm_kwargs: dict) -> list[str]:
    """``vllm serve`` flags of a benchmark config's ``LLM(...)`` kwargs."""
    flags = []
    for key, value in llm_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


@contextmanager
def served(model_dir: str, flags: list[str], log_path: Path, startup_timeout: float = 420.0):
    """A ``vllm serve`` process group on a free local port; yields its base URL."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    port = free_port()
    args = [vllm, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), *flags]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1"}
    log = open(log_path, "w")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({server.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not healthy in {startup_timeout:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield base, server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` as {metric name: value summed over its label sets}."""
    values: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def jobs(spec: SoakSpec, prompts: dict[int, list[int]], count: int = 100_000):
    rng = random.Random(spec.seed)
    kinds, weights = zip(*spec.mix.items())
    for index in range(count):
        kind = rng.choices(kinds, weights)[0]
        length = rng.choice(spec.prompt_tokens)
        yield {"index": index, "kind": kind, "prompt": prompts[length][: length], "max_tokens": rng.choice(spec.max_tokens),
               "hostile": HOSTILE[index % len(HOSTILE)], "drop_after": rng.randint(1, 4), "keep_all": rng.random() < 0.2}


def _stream(base: str, model: str, job: dict, read_timeout: float = 600.0, settings: bool = False) -> dict:
    body = {"model": model, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if settings and job["keep_all"]:
        body["vllm_xargs"] = {"kvcompress_compression_ratio": 0}
    started = time.perf_counter()
    first, chunks, tokens = None, 0, None
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=(10, read_timeout)) as reply:
        if reply.status_code != 200:
            return {"status": reply.status_code, "error": reply.text[:300]}
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if not data.get("choices"):
                continue
            chunks += 1
            if first is None:
                first = time.perf_counter() - started
            if job["kind"] == "disconnect" and chunks >= job["drop_after"]:
                return {"status": 200, "dropped_after": chunks}  # closing the response hangs up
    return {"status": 200, "ttft": first, "latency": time.perf_counter() - started, "tokens": tokens}


def run_job(base: str, model: str, job: dict, settings: bool = False) -> dict:
    kind = job["kind"]
    try:
        if kind == "hostile":
            xargs, words = job["hostile"]
            reply = requests.post(f"{base}/v1/completions", timeout=60, json={
                "model": model, "prompt": job["prompt"][:16], "max_tokens": 4, "vllm_xargs": xargs})
            ok = reply.status_code == 400 and "kvcompress" in reply.text and (words in reply.text or not settings)
            return {"kind": kind, "ok": ok, "status": reply.status_code, "error": None if ok else reply.text[:300]}
        if kind == "give_up":
            try:
                _stream(base, model, job, read_timeout=0.05)
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                pass  # a read timeout mid-stream surfaces as ConnectionError
            return {"kind": kind, "ok": True}
        result = _stream(base, model, job, settings=settings)
        ok = result["status"] == 200 and (kind == "disconnect" or result.get("tokens") == job["max_tokens"])
        return {"kind": kind, "ok": ok, **result}
    except requests.RequestException as exc:
        return {"kind": kind, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def control(base: str, model: str, prompt: list[int], max_tokens: int) -> str:
    reply = requests.post(f"{base}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def wait_idle(base: str, timeout: float = 120.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        metrics = scrape(base)
        if metrics.get("vllm:num_requests_running", 0) == 0 and metrics.get("vllm:num_requests_waiting", 0) == 0:
            return metrics
        if time.time() > deadline:
            raise TimeoutError(f"requests still in the scheduler after {timeout:.0f} s: {metrics}")
        time.sleep(0.5)


def soak(base: str, model: str, spec: SoakSpec, prompts: dict[int, list[int]], control_prompt: list[int],
         progress=None, per_request_settings: bool = False) -> dict:
    """Play the load against a running server; return the measurements and the checks.
    ``per_request_settings``: the server runs an eviction method (takes kvcompress xargs)."""
    before = control(base, model, control_prompt, spec.control_tokens)
    queue, lock, results = jobs(spec, prompts), threading.Lock(), []
    deadline = time.perf_counter() + spec.duration_s
    peak: dict[str, float] = {}

    def client():
        while time.perf_counter() < deadline:
            with lock:
                job = next(queue)
            outcome = run_job(base, model, job, per_request_settings)
            with lock:
                results.append({"index": job["index"], "prompt_tokens": len(job["prompt"]), **outcome})
                if progress is not None:
                    progress(len(results))

    def sampler():  # the plugin's gauges are only meaningful while requests run
        while time.perf_counter() < deadline:
            try:
                for name, value in scrape(base).items():
                    if name.startswith("kvcompress:") or name == "vllm:kv_cache_usage_perc":
                        peak[name] = max(peak.get(name, 0.0), value)
            except requests.RequestException:
                pass
            time.sleep(2)

    threads = [threading.Thread(target=client) for _ in range(spec.concurrency)] + [threading.Thread(target=sampler)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.perf_counter() - started
    wait_idle(base)
    after = control(base, model, control_prompt, spec.control_tokens)
    final = wait_idle(base)
    return summarize(results, load_s, before, after, final, peak)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(results: list[dict], load_s: float, before: str, after: str, final: dict, peak: dict) -> dict:
    completed = [r for r in results if r["kind"] == "complete" and r["ok"]]
    latencies, ttfts = [r["latency"] for r in completed], [r["ttft"] for r in completed]
    failures = [r for r in results if not r["ok"]]
    counts = {kind: sum(r["kind"] == kind for r in results) for kind in ("complete", "disconnect", "give_up", "hostile")}
    return {
        "load_s": round(load_s, 1),
        "requests": len(results),
        "served": len(completed),
        "by_kind": counts,
        "failures": failures[:20],
        "num_failures": len(failures),
        "hostile_400": sum(r["kind"] == "hostile" and r["ok"] for r in results),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p99_s": _percentile(ttfts, 99),
        "output_tokens": sum(r["tokens"] for r in completed),
        "control_unchanged": before == after,
        "control_text": before,
        "kv_cache_usage_after": final.get("vllm:kv_cache_usage_perc"),
        "preemptions": final.get("vllm:num_preemptions_total", 0.0),
        "plugin_metrics": {k: v for k, v in final.items() if k.startswith("kvcompress:")},
        "peak": peak,
    }


def checks(summary: dict) -> list[str]:
    """What must hold after a soak; empty = passed."""
    problems = []
    if summary["num_failures"]:
        problems.append(f"{summary['num_failures']} requests failed, e.g. {summary['failures'][:3]}")
    if not summary["control_unchanged"]:
        problems.append("the control request's output changed under load")
    if summary["kv_cache_usage_after"] != 0.0:
        problems.append(f"KV cache usage after the load is {summary['kv_cache_usage_after']} (blocks leaked)")
    if not summary["served"]:
        problems.append("no request completed")
    return problems
