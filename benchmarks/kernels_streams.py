"""HeadKV stream decode on a CUDA GPU: correctness, then time per decoded token.

    python -m benchmarks.kernels_streams --out DIR [--scores FILE] [--quick]

One decode step of a batch over every layer of a model shaped like Qwen2.5-1.5B (28
layers, 12 query / 2 KV heads, head_dim 128) or Llama-3-8B (32 layers, 32/8), bf16:
1. Correctness: ``stream_attention_triton.stream_decode`` vs
   ``stream_attention_ref.decode_attention`` on the GPU, variable per-head lengths.
2. Timings (``triton.testing.do_bench``, median, summed over layers) at equal total KV:
   * HeadKV streams: per-(layer, KV head) budgets from ``allocate_budgets`` over head
     scores (``--scores``, else a fixed power-law profile), Triton stream kernel;
   * uniform budget: every head keeps the average, the dense paged Triton kernel;
   * full cache: the whole context, the dense paged Triton kernel.
   Ratios: HeadKV / uniform (cost of variable lengths at equal memory) and full / HeadKV.
Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from triton.testing import do_bench

from vllm_kvcompress.methods.headkv import allocate_budgets, load_head_scores
from vllm_kvcompress.kernels import dense_triton, stream_attention_ref, stream_attention_triton

MODELS = {"qwen2.5-1.5b": (28, 12, 2, 128), "llama-3-8b": (32, 32, 8, 128)}
PAGE = 16


def power_law_scores(streams: int, gen: torch.Generator) -> list[float]:
    """A retrieval-head-like profile: a few heads carry most of the importance."""
    raw = torch.rand(streams, generator=gen).pow(4)
    return (raw / raw.sum()).tolist()


def stream_case(budgets: list[int], batch: int, heads: int, head_dim: int, group: int, gen, device):
    """Pages of every (request, head) of one layer: a shuffled pool holding all of them."""
    need = [-(-b // PAGE) for b in budgets]
    total = batch * sum(need)
    pool = torch.randn(total * PAGE, 2 * head_dim, generator=gen).to(torch.bfloat16)
    perm = torch.randperm(total, generator=gen)
    width = max(need)
    pages = torch.zeros(batch, heads, width, dtype=torch.int32)
    used = 0
    for b in range(batch):
        for h, n in enumerate(need):
            pages[b, h, :n] = perm[used:used + n].int()
            used += n
    lengths = torch.tensor(budgets, dtype=torch.int32).repeat(batch, 1)
    query = torch.randn(batch, heads * group, head_dim, generator=gen).to(torch.bfloat16)
    return query.to(device), pool.to(device), pages.to(device), lengths.to(device)


def dense_case(length: int, batch: int, heads: int, head_dim: int, group: int, gen, device, block: int = 16):
    blocks = -(-length // block)
    cache = torch.randn(batch * blocks, heads, block, 2 * head_dim, generator=gen).to(torch.bfloat16)
    table = torch.randperm(batch * blocks, generator=gen).view(batch, blocks).int()
    lens = torch.full((batch,), length, dtype=torch.int32)
    query = torch.randn(batch, heads * group, head_dim, generator=gen).to(torch.bfloat16)
    return query.to(device), cache.to(device), table.to(device), lens.to(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scores", help="head-scores file for --model qwen2.5-1.5b-shaped runs (else power law)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda"
    gen = torch.Generator().manual_seed(0)
    checks, rows = [], []
    # 1. correctness on the GPU
    for heads, group, head_dim in ((2, 6, 128), (8, 4, 128), (2, 7, 64)):
        budgets = allocate_budgets(power_law_scores(heads, gen), 256, 8, 1.2, PAGE)
        q, pool, pages, lengths = stream_case(budgets, 4, heads, head_dim, group, gen, device)
        out = stream_attention_triton.stream_decode(q, pool, pages, lengths, PAGE, head_dim ** -0.5)
        ref = stream_attention_ref.decode_attention(q.float(), pool.float(), pages.long(), lengths.long(), PAGE,
                                                    head_dim ** -0.5)
        rel = float((out.float() - ref).norm() / ref.norm())
        checks.append({"heads": heads, "group": group, "head_dim": head_dim, "budgets": budgets, "rel_error": rel})
        assert rel < 1e-2, checks[-1]
    # 2. timings
    shapes = [("qwen2.5-1.5b", 32, 16384, 512), ("llama-3-8b", 16, 16384, 512)]
    if not args.quick:
        shapes += [("qwen2.5-1.5b", 64, 32768, 1024), ("qwen2.5-1.5b", 32, 16384, 128), ("llama-3-8b", 32, 32768, 1024)]
    for model, batch, context, average in shapes:
        layers, q_heads, kv_heads, head_dim = MODELS[model]
        group, streams = q_heads // kv_heads, layers * kv_heads
        if args.scores and model == "qwen2.5-1.5b":
            profile = load_head_scores(args.scores, layers, q_heads, kv_heads).kv_head_scores()
        else:
            profile = power_law_scores(streams, gen)
        budgets = allocate_budgets(profile, average, 8, 1.2, PAGE)
        scale = head_dim ** -0.5
        t_stream = t_uniform = t_full = 0.0
        for layer in range(layers):
            layer_budgets = budgets[layer * kv_heads:(layer + 1) * kv_heads]
            q, pool, pages, lengths = stream_case(layer_budgets, batch, kv_heads, head_dim, group, gen, device)
            t_stream += do_bench(lambda: stream_attention_triton.stream_decode(q, pool, pages, lengths, PAGE, scale,
                                                                               out_dtype=torch.bfloat16))
            if layer == 0:  # uniform and full cost the same in every layer
                q, cache, table, lens = dense_case(average, batch, kv_heads, head_dim, group, gen, device)
                t_uniform = layers * do_bench(lambda: dense_triton.dense_decode(q, cache, table, lens, scale,
                                                                                 out_dtype=torch.bfloat16))
                q, cache, table, lens = dense_case(context, batch, kv_heads, head_dim, group, gen, device)
                t_full = layers * do_bench(lambda: dense_triton.dense_decode(q, cache, table, lens, scale,
                                                                              out_dtype=torch.bfloat16))
                del cache
        rows.append({"model": model, "batch": batch, "context": context, "average_budget": average,
                     "budget_min": min(budgets), "budget_max": max(budgets), "total_rows": sum(budgets),
                     "headkv_ms": t_stream, "uniform_ms": t_uniform, "full_ms": t_full,
                     "headkv_over_uniform": t_stream / t_uniform, "full_over_headkv": t_full / t_stream})
        print(rows[-1])
    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "checks": checks, "timings": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [f"# HeadKV stream decode ({report['date']}, {report['gpu']})", "",
             f"Correctness vs the PyTorch reference on the GPU: {len(checks)} cases, largest relative error "
             f"{max(c['rel_error'] for c in checks):.1e}.", "",
             "One decode step over all layers, bf16, equal total KV for HeadKV and uniform:", "",
             "| model shape | batch | context | avg budget | budgets min..max | HeadKV ms | uniform ms | full ms | "
             "HeadKV / uniform | full / HeadKV |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['average_budget']} | {r['budget_min']}.."
                     f"{r['budget_max']} | {r['headkv_ms']:.3f} | {r['uniform_ms']:.3f} | {r['full_ms']:.3f} | "
                     f"{r['headkv_over_uniform']:.2f} | {r['full_over_headkv']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
