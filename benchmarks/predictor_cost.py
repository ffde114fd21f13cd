"""The learned methods' scoring cost per decode step, as the engine runs it: every layer's
KVzap predictor (linear or MLP) or DMS adapter on the step's tokens, through the same
scoring functions the custom op calls (``kvcompress::score_into``), into the same
per-layer buffers. On CUDA all layers are captured in one CUDA graph and replayed, as the
compiled model's pieces replay them (timed with CUDA events); on the CPU, wall time.

    python -m benchmarks.predictor_cost --device cuda --tokens 32 320 --out DIR
    python -m benchmarks.predictor_cost --device cuda --summary DIR/summary.json   # % of each row's step

Each kind runs twice, with the PyTorch reference ops and with the engine's choice (``auto``:
the Triton twin of ``ops.linear_scores`` on CUDA for KVzap-linear and DMS, one launch per
layer; the MLP is its module either way); ``x_reference`` is the reference's time over this one.

``--summary``: a ``benchmarks.gpu_engine`` summary from the same machine. Each learned row's
TPOT at B=32 is the step the scoring is a share of (``predictor_pct_b32``; the issue's goal is
at most 2%). Shape: Llama-3-8B (32 layers, hidden 4096, 8 KV heads), weights random: the cost
depends on the shapes only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_kvcompress.kernels import ops

KINDS = ("kvzap-linear", "kvzap-mlp", "dms")
ROWS = {"kvzap-linear": "kvzap-4x", "kvzap-mlp": None, "dms": "dms-4x"}  # the gpu_engine row each one serves


def scorers(kind: str, layers: int, hidden: int, kv_heads: int, device: torch.device) -> list:
    """Per layer, ``hidden states [T, hidden] -> scores [T, KV heads]`` as the engine's op scores."""
    from vllm_kvcompress.methods.kvzap.hooks import _scorer
    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor, MLPPredictor

    torch.manual_seed(0)
    if kind == "dms":
        from vllm_kvcompress.methods.dms.checkpoint import DMSDecisions
        from vllm_kvcompress.methods.dms.decisions import DMSAdapter
        from vllm_kvcompress.methods.dms.hooks import _linear_keep_scores

        adapters = [DMSAdapter(hidden, kv_heads).to(device) for _ in range(layers)]
        decisions = DMSDecisions(adapters, 256, per_layer=False, source="random")
        return [_linear_keep_scores(decisions, i, None) for i in range(layers)]
    module = LinearPredictor if kind == "kvzap-linear" else MLPPredictor
    predictors = [module(hidden, kv_heads).to(device).eval() for _ in range(layers)]
    return [_scorer(p, None) for p in predictors]


def graph_times_ms(step, repeats: int) -> list[float]:
    """``step`` captured in one CUDA graph, then each replay's time (CUDA events)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure(kind: str, tokens: int, device: torch.device, layers: int, hidden: int, kv_heads: int,
            dtype: torch.dtype, repeats: int, kernels: str = "auto") -> dict:
    with ops.use(kernels):  # the seam picks while the graph is captured: its kernels replay
        return _measure(kind, tokens, device, layers, hidden, kv_heads, dtype, repeats) | {"kernels": kernels}


def _measure(kind: str, tokens: int, device: torch.device, layers: int, hidden: int, kv_heads: int,
             dtype: torch.dtype, repeats: int) -> dict:
    score = scorers(kind, layers, hidden, kv_heads, device)
    hidden_states = [torch.randn(tokens, hidden, device=device, dtype=dtype) for _ in range(layers)]
    buffers = [torch.zeros(tokens, kv_heads, device=device) for _ in range(layers)]

    def step():
        with torch.no_grad():
            for layer in range(layers):
                buffers[layer].copy_(score[layer](hidden_states[layer]))

    for _ in range(3):
        step()
    times = []
    if device.type == "cuda":
        times = graph_times_ms(step, repeats)
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - began))
    return {"kind": kind, "tokens": tokens, "device": str(device), "ms_per_step": round(statistics.median(times), 4),
            "layers": layers, "hidden": hidden, "kv_heads": kv_heads, "dtype": str(dtype).removeprefix("torch.")}


def sweep_tiles(tokens: int, device: torch.device, layers: int, hidden: int, kv_heads: int, repeats: int) -> list[dict]:
    """The Triton scoring kernel alone (DMS's form: RMSNorm + linear), ``layers`` launches in
    one CUDA graph, for tile choices around :func:`scores_triton.tiles`' (marked ``chosen``)."""
    from vllm_kvcompress.kernels import scores_triton

    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    weight, bias = torch.randn(kv_heads, hidden, device=device), torch.randn(kv_heads, device=device)
    gain = torch.rand(hidden, device=device) + 0.5
    chosen = scores_triton.tiles(tokens, hidden, kv_heads)
    rows = []
    for block_t in (1, 2, 4):
        for block_d in (256, 1024, 2048):
            for num_warps in (4, 8):
                tile = {"block_t": block_t, "block_d": block_d, "num_warps": num_warps}
                for _ in range(2):
                    scores_triton.linear_scores(x, weight, bias, gain, **tile)

                def step():
                    for _ in range(layers):
                        scores_triton.linear_scores(x, weight, bias, gain, **tile)

                times = graph_times_ms(step, repeats)
                rows.append({"sweep": "linear_scores", "tokens": tokens, **tile, "chosen": tile == chosen,
                             "us_per_layer": round(1000 * statistics.median(times) / layers, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return sorted(rows, key=lambda r: r["us_per_layer"])


def with_step_share(rows: list[dict], summary: dict) -> list[dict]:
    """Each row's share of the same-session gpu_engine row's B=32 step (TPOT), where there is one."""
    steps = {r["config"]: r.get("tpot_ms_b32") for r in summary.get("rows", [])}
    for row in rows:
        step = steps.get(ROWS.get(row["kind"]) or "")
        if step and row["tokens"] == 32 and row.get("kernels", "auto") == "auto":
            row["step_ms_b32"] = step
            row["predictor_pct_b32"] = round(100 * row["ms_per_step"] / step, 2)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 320], help="tokens per step (batch size)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--summary", type=Path, help="a gpu_engine summary.json of the same machine")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sweep-tiles", action="store_true", help="CUDA: time the scoring kernel's tile choices")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.sweep_tiles:
        rows = [r for tokens in args.tokens
                for r in sweep_tiles(tokens, device, args.layers, args.hidden, args.kv_heads, args.repeats)]
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "scores_tiles.json").write_text(json.dumps(rows, indent=1))
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for kind in args.kinds:
        for tokens in args.tokens:
            reference, chosen = (measure(kind, tokens, device, args.layers, args.hidden, args.kv_heads, dtype,
                                         args.repeats, kernels) for kernels in ("reference", "auto"))
            chosen["x_reference"] = round(reference["ms_per_step"] / chosen["ms_per_step"], 2)
            rows += [reference, chosen]
    if args.summary is not None:
        rows = with_step_share(rows, json.loads(args.summary.read_text()))
    for row in rows:
        print(json.dumps(row))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "predictor_cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
