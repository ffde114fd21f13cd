"""The stream prefill on a CUDA GPU: the Triton kernel (``stream_prefill_triton``) against the
PyTorch reference the engine ran before it (torch SDPA over gathered rows with DMS's mask,
``stream_attention_ref.prefill_attention`` + ``delayed_visible``), correctness first, then time
per layer call in the same run, and the ratio.

    python -m benchmarks.kernels_stream_prefill --out DIR [--quick]

Shape: Llama-3-8B's attention (32 query / 8 KV heads, head_dim 128), bf16, pages of 16 rows
scattered in the pool. Cells: a whole prompt (q_len = length) and a chunk after context, under
DMS's rule (window 256, about 3/4 of the older keys hidden) and causal only over streams of
unequal length (HeadKV's chunked prefill after its compression). Timed with
``triton.testing.do_bench`` (median). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, WINDOW = 32, 8, 128, 16, 256
CELLS = [("dms", 2048, 2048), ("dms", 8192, 8192), ("dms", 2048, 16384), ("unequal", 2048, 8192)]
QUICK_CELLS = [("dms", 512, 1024), ("unequal", 256, 1024)]


def case(kind: str, q_len: int, length: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    per_stream = -(-length // PAGE)
    num_pages = KV_HEADS * per_stream + 7
    pool = torch.randn(num_pages * PAGE, 2 * HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)
    pages = torch.randperm(num_pages, generator=gen, device=device)[: KV_HEADS * per_stream].view(KV_HEADS, per_stream)
    query = torch.randn(q_len, Q_HEADS, HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)
    lengths = torch.full((KV_HEADS,), length, device=device)
    if kind == "unequal":  # heads keep different budgets: each stream its own length
        lengths -= torch.arange(KV_HEADS, device=device) * (length // (2 * KV_HEADS))
        lengths = torch.maximum(lengths, torch.tensor(q_len, device=device))
    row_scores = torch.randn(num_pages * PAGE, generator=gen, device=device) - 0.67  # ~1/4 pass 0
    return pool, pages, lengths, query, row_scores


def run_cell(kind: str, q_len: int, length: int, device) -> dict:
    import triton.testing

    from vllm_kvcompress.kernels import stream_attention_ref, stream_prefill_triton

    pool, pages, lengths, query, row_scores = case(kind, q_len, length, device)
    scale = HEAD_DIM ** -0.5
    rule = (row_scores, WINDOW, 0.0) if kind == "dms" else ()
    longest = int(lengths.max())

    def reference():
        visible = None
        if kind == "dms":
            key_rows = stream_attention_ref.page_rows(pages, PAGE)[:, :longest]
            visible = stream_attention_ref.delayed_visible(row_scores[key_rows], lengths, q_len, WINDOW)
        return stream_attention_ref.prefill_attention(query, pool, pages, lengths, PAGE, scale, visible, longest, False)

    def triton_kernel():
        return stream_prefill_triton.prefill_attention(query, pool, pages, lengths, PAGE, scale, *rule)

    want, got = reference().float(), triton_kernel().float()
    error = float((got - want).abs().max() / want.abs().max())
    ref_ms = triton.testing.do_bench(reference, warmup=3, rep=30)
    triton_ms = triton.testing.do_bench(triton_kernel, warmup=3, rep=30)
    return {"kind": kind, "q_len": q_len, "length": length, "relative_error": round(error, 5),
            "reference_ms": round(ref_ms, 3), "triton_ms": round(triton_ms, 3), "x_reference": round(ref_ms / triton_ms, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_stream_prefill times the kernel on a CUDA GPU; the CPU test is "
                         "tests/test_stream_prefill_triton.py")
    rows = []
    for kind, q_len, length in QUICK_CELLS if args.quick else CELLS:
        rows.append(run_cell(kind, q_len, length, torch.device("cuda")))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
            "host": platform.node(), "shape": f"{Q_HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, bf16, page {PAGE}"}
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# Stream prefill, Triton vs PyTorch reference ({meta['device']}, {meta['date']})", "",
             f"{meta['shape']}; DMS window {WINDOW}. Time per layer call, same run.", "",
             "| cell | q_len | length | relative error | reference ms | Triton ms | x reference |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['q_len']} | {r['length']} | {r['relative_error']} | {r['reference_ms']} | "
              f"{r['triton_ms']} | {r['x_reference']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
