"""LOOKAT Triton kernels on a CUDA GPU: correctness on realistic shapes, then decode timings.

    python -m benchmarks.kernels_lookat --out DIR [--quick] [--sweep]

1. Correctness: every (model, m, value bits) variant of ``lookat_triton.lookat_decode``
   against ``lookat_ref.decode_attention`` (CPU, fp32), ``dense_triton.dense_decode`` and
   torch SDPA against ``paged_dense_ref.decode_attention``, on ragged batches over shuffled
   block tables; relative error ``|out - ref| / |ref|``.
2. Timings (``triton.testing.do_bench``, median; it flushes L2 before every repetition):
   fused LOOKAT decode (ADC table build + attention + partition combine, one op),
   the bf16 dense Triton paged decode, and ``F.scaled_dot_product_attention`` (query
   length 1, ``enable_gqa``) over dense contiguous bf16 K/V, for batch x context.
   Bytes per op: cache rows actually read (+ block table), and for LOOKAT the tables
   (written once, read once); achieved GB/s against the GPU's peak.
``--sweep`` first times block sizes / warps / stages / partitions / table dtype on a few
shapes (``sweep.json``) — how the defaults in the kernels were chosen.
Writes ``results.json``, ``results.md`` (and ``speedup.png``) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import functools
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from vllm_kvcompress.kernels import dense_triton, lookat_ref, lookat_triton, paged_dense_ref, triton_common

MODELS = {  # attention shapes of the served models
    "qwen2.5-0.5b": {"hq": 14, "hkv": 2, "d": 64},
    "qwen2.5-1.5b": {"hq": 12, "hkv": 2, "d": 128},
    "llama-3-8b": {"hq": 32, "hkv": 8, "d": 128},
}
BATCHES = (1, 4, 16, 64)
CONTEXTS = (4096, 16384, 32768, 65536)
MS = (8, 16, 32)
BITS = (16, 8, 4)
BLOCK_SIZE = 16
PEAKS = [("H100 PCIe", 2000.0, "H100 PCIe, 2.0 TB/s"), ("H100 NVL", 3900.0, "H100 NVL, 3.9 TB/s"),
         ("H100", 3350.0, "H100 SXM (HBM3), 3.35 TB/s"), ("H200", 4800.0, "H200, 4.8 TB/s")]


def peak_bandwidth(name: str) -> tuple[float, str]:
    for key, gbs, label in PEAKS:
        if key in name:
            return gbs, label
    return float("nan"), "unknown GPU: no peak"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def shuffled_table(batch: int, blocks_per_req: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_req]
    return perm.view(batch, blocks_per_req).int()


def lookat_cache(num_blocks: int, hkv: int, layout: lookat_ref.LookatLayout, gen: torch.Generator,
                 device: str) -> torch.Tensor:
    """Random codes and payload bytes, with valid (finite, realistic) 16-bit values and scales."""
    cache = torch.randint(0, 256, (num_blocks, hkv, BLOCK_SIZE, layout.row_bytes), dtype=torch.uint8, device=device)
    rows = cache.view(-1, layout.row_bytes)
    m, vb = layout.m, layout.value_bytes
    if layout.value_bits == 16:
        rows[:, m:m + vb].view(layout.value_dtype).copy_(torch.randn(rows.shape[0], layout.head_dim, device=device))
    elif layout.value_bits == 8:
        rows[:, m + vb:].view(torch.float16).copy_(torch.rand(rows.shape[0], 1, device=device) * 0.02 + 0.005)
    else:
        prm = torch.stack([torch.rand(rows.shape[0], device=device) * 0.3 + 0.1,
                           -torch.rand(rows.shape[0], device=device) * 2 - 0.5], -1)
        rows[:, m + vb:].view(torch.float16).copy_(prm)
    return cache


def codebooks_for(hkv: int, m: int, d: int, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(hkv, m, 256, d // m, generator=gen).to(device)


# ------------------------------------------------------------------ correctness


def correctness(device: str, models: list[str], scores: list[str], quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    lens = [4096, 1500, 2731, 17] if not quick else [2048, 333]
    for name in models:
        shape = MODELS[name]
        hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
        scale = d ** -0.5
        bpr = -(-max(lens) // BLOCK_SIZE)
        num_blocks = len(lens) * bpr + 5
        table = shuffled_table(len(lens), bpr, num_blocks, gen)
        kv_lens = torch.tensor(lens, dtype=torch.int32)
        query = (torch.randn(len(lens), hq, d, generator=gen) * 3).bfloat16()  # peaked softmax: logit std ~3
        for m in MS:
            codebooks = codebooks_for(hkv, m, d, "cpu", gen)
            for bits in BITS:
                layout = lookat_ref.LookatLayout(head_dim=d, m=m, value_bits=bits)
                cache = lookat_cache(num_blocks, hkv, layout, gen, "cpu")
                ref = lookat_ref.decode_attention(query, cache, table.long(), kv_lens, codebooks, None, layout, scale)
                variants = [("adc", torch.float32, None), ("adc", torch.float32, 1), ("adc", torch.float16, None)]
                variants += [(sc, torch.float32, None) for sc in scores if sc != "adc"]
                for score, lut_dtype, splits in variants:
                    out = lookat_triton.lookat_decode(
                        query.to(device), cache.to(device), table.to(device), kv_lens.to(device),
                        codebooks.to(device), layout, scale, lut_dtype=lut_dtype, num_splits=splits, score=score)
                    rows.append({"op": f"lookat-{score}", "model": name, "m": m, "value_bits": bits,
                                 "lut": "bf16 codebooks" if score.startswith("rebuilt") else str(lut_dtype)[6:],
                                 "splits": "auto" if splits is None else 1, "rel_err": rel_err(out, ref)})
        cache = torch.randn(num_blocks, hkv, BLOCK_SIZE, 2 * d, generator=gen).bfloat16()
        ref = paged_dense_ref.decode_attention(query, cache, table.long(), kv_lens, scale)
        for splits in (None, 1):
            out = dense_triton.dense_decode(query.to(device), cache.to(device), table.to(device), kv_lens.to(device),
                                            scale, num_splits=splits)
            rows.append({"op": "dense_triton", "model": name, "splits": "auto" if splits is None else 1,
                         "rel_err": rel_err(out, ref)})
        full = paged_dense_ref.decode_attention(query[:1], cache, table[:1].long(), kv_lens[:1], scale)
        k, v = paged_dense_ref.gather_kv(cache, table[0].long(), lens[0])
        sdpa = F.scaled_dot_product_attention(query[:1].to(device).unsqueeze(2), k[None].to(device),
                                              v[None].to(device), scale=scale, enable_gqa=True)
        rows.append({"op": "sdpa", "model": name, "rel_err": rel_err(sdpa[:, :, 0], full)})
    return rows


# ------------------------------------------------------------------ timing


def bench_ms(fn, quick: bool, graph: bool = True) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (as vLLM runs decode: no Python launch
    overhead in the timing); ``do_bench`` flushes L2 before each replay."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    t = float(do_bench(run, warmup=10 if quick else 20, rep=30 if quick else 60, return_mode="median"))
    if graph:
        del g
    return t


def lookat_bytes(batch, ctx, hkv, hq, d, layout, cfg) -> int:
    """Cache rows + block table + query/output, and the tables: per-request ADC tables
    (written once, read once) or, for "rebuilt", the bf16 codebooks once."""
    blocks = batch * -(-ctx // BLOCK_SIZE)
    if cfg["score"].startswith("rebuilt"):
        table = hkv * 256 * d * 2
    else:
        elt = torch.empty((), dtype=cfg["lut_dtype"]).element_size()
        table = 2 * batch * hkv * layout.m * 256 * triton_common._next_pow2(hq // hkv) * elt
    return batch * ctx * hkv * layout.row_bytes + blocks * 4 + table + batch * hq * d * (2 + 4)


def dense_bytes(batch, ctx, hkv, hq, d) -> int:
    return batch * ctx * hkv * 4 * d + batch * -(-ctx // BLOCK_SIZE) * 4 + batch * hq * d * (2 + 4)


class Shape:
    """Inputs of one (model, batch, context) cell, shared by every op."""

    def __init__(self, model: str, batch: int, ctx: int, device: str, gen: torch.Generator, dense: bool = True):
        s = MODELS[model]
        self.hq, self.hkv, self.d = s["hq"], s["hkv"], s["d"]
        self.batch, self.ctx, self.device = batch, ctx, device
        self.scale = self.d ** -0.5
        self.bpr = -(-ctx // BLOCK_SIZE)
        self.num_blocks = batch * self.bpr
        self.table = shuffled_table(batch, self.bpr, self.num_blocks, gen).to(device)
        self.kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.query = torch.randn(batch, self.hq, self.d, device=device).bfloat16()
        self.dense = None
        if dense:
            self.dense = torch.randn(self.num_blocks, self.hkv, BLOCK_SIZE, 2 * self.d, device=device,
                                     dtype=torch.bfloat16)

    def lookat(self, m: int, bits: int, gen: torch.Generator):
        layout = lookat_ref.LookatLayout(head_dim=self.d, m=m, value_bits=bits)
        return layout, lookat_cache(self.num_blocks, self.hkv, layout, gen, self.device), \
            codebooks_for(self.hkv, m, self.d, self.device, gen)

    def lookat_fn(self, layout, cache, codebooks, **tune):
        cfg = {**lookat_triton.DEFAULTS, **tune}
        lut = codebooks.to(torch.bfloat16).contiguous() if cfg["score"].startswith("rebuilt") else None  # per-layer constant
        return lambda: lookat_triton.lookat_decode(self.query, cache, self.table, self.kv_lens, codebooks, layout,
                                                   self.scale, max_kv_len=self.ctx, lut=lut, **tune)

    def dense_fn(self, **tune):
        return lambda: dense_triton.dense_decode(self.query, self.dense, self.table, self.kv_lens, self.scale,
                                                 max_kv_len=self.ctx, **tune)


def need_bytes(model: str, batch: int, ctx: int) -> int:
    s = MODELS[model]
    dense = batch * ctx * s["hkv"] * 4 * s["d"]
    return 2 * dense + dense // 2  # paged bf16 + SDPA K/V + the largest LOOKAT cache (16-bit values)


def run_timings(device: str, models: list[str], batches, contexts, ms, bits_list, scores, quick: bool,
                log, checkpoint=None) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    free_total = torch.cuda.mem_get_info()[1]
    for model in models:
        for ctx in contexts:
            for batch in batches:
                cell = {"model": model, "batch": batch, "context": ctx}
                if need_bytes(model, batch, ctx) > 0.8 * free_total:
                    rows.append({**cell, "op": "skipped", "why": "does not fit GPU memory"})
                    log(f"skip {cell}: needs {need_bytes(model, batch, ctx) / 2**30:.1f} GiB")
                    continue
                sh = Shape(model, batch, ctx, device, gen)
                t_dense = bench_ms(sh.dense_fn(), quick)
                rows.append({**cell, "op": "dense_triton", "ms": t_dense,
                             "bytes": dense_bytes(batch, ctx, sh.hkv, sh.hq, sh.d)})
                k = torch.randn(batch, sh.hkv, ctx, sh.d, device=device, dtype=torch.bfloat16)
                v = torch.randn_like(k)
                q4 = sh.query.unsqueeze(2)
                t_sdpa = bench_ms(functools.partial(F.scaled_dot_product_attention, q4, k, v, scale=sh.scale,
                                                    enable_gqa=True), quick)
                rows.append({**cell, "op": "sdpa", "ms": t_sdpa, "bytes": batch * ctx * sh.hkv * 4 * sh.d})
                del k, v, q4
                sh.dense = None
                for m in ms:
                    if sh.d % m or sh.d // m < 2:
                        continue
                    for bits in bits_list:
                        layout, cache, codebooks = sh.lookat(m, bits, gen)
                        for score in scores:
                            cfg = lookat_triton.tuned(sh.d, m, bits, batch, score)
                            t = bench_ms(sh.lookat_fn(layout, cache, codebooks, **cfg), quick)
                            rows.append({**cell, "op": f"lookat-{score}", "m": m, "value_bits": bits, "ms": t,
                                         "row_bytes": layout.row_bytes,
                                         "bytes": lookat_bytes(batch, ctx, sh.hkv, sh.hq, sh.d, layout,
                                                               {**lookat_triton.DEFAULTS, **cfg}),
                                         "vs_dense_triton": t_dense / t, "vs_sdpa": t_sdpa / t})
                        del cache
                log(f"{model} B={batch} ctx={ctx}: dense {t_dense * 1e3:.1f} us, sdpa {t_sdpa * 1e3:.1f} us, "
                    + ", ".join(f"{r['op'][7:]} m{r['m']}/{r['value_bits']}b {r['ms'] * 1e3:.1f}" for r in rows
                                if r["op"].startswith("lookat") and r["batch"] == batch and r["context"] == ctx
                                and r["model"] == model))
                del sh
                torch.cuda.empty_cache()
                if checkpoint is not None:
                    checkpoint(rows)
    return rows


# ------------------------------------------------------------------ sweep


SWEEP_CELLS = [("qwen2.5-0.5b", 8, 4), ("qwen2.5-1.5b", 16, 16), ("qwen2.5-0.5b", 16, 8)]
SWEEP_SHAPES = [(1, 32768), (64, 32768)]


def sweep(device: str, log, dense: bool = True, cells=None, shapes=None) -> list[dict]:
    """Score mode x table dtype x launch parameters on representative cells ``(model, m,
    value bits)`` x shapes ``(batch, context)``, then the partition count for the best; how
    the defaults in the kernels were chosen."""
    gen = torch.Generator().manual_seed(2)
    out = []
    cells = cells or SWEEP_CELLS
    shapes = shapes or SWEEP_SHAPES
    grid = [{"score": sc, "lut_dtype": dt, "block_n": bn, "num_warps": nw, "num_stages": 1}
            for sc in lookat_triton.SCORES
            for dt in ((torch.float32, torch.float16) if sc == "adc" else (torch.float32,))
            for bn in (32, 64, 128) for nw in (4, 8)]
    for model, m, bits in cells:
        for batch, ctx in shapes:
            sh = Shape(model, batch, ctx, device, gen, dense=False)
            layout, cache, codebooks = sh.lookat(m, bits, gen)
            best = dict(lookat_triton.DEFAULTS)
            for stage in (grid, [{"programs_per_sm": p} for p in (1, 2, 4, 8, 16)]):
                results = []
                for over in stage:
                    cfg = {**best, **over}
                    try:
                        t = bench_ms(sh.lookat_fn(layout, cache, codebooks, **cfg), True)
                    except Exception as e:  # out of resources for this shape: skip the config
                        log(f"  config {over} failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    results.append((t, over))
                    out.append({"op": "lookat", "model": model, "m": m, "value_bits": bits, "batch": batch,
                                "context": ctx, **{k: str(v) for k, v in cfg.items()}, "ms": t})
                if results:
                    t, over = min(results, key=lambda r: r[0])
                    best.update(over)
            for sc in lookat_triton.SCORES:
                ts = [r["ms"] for r in out if r["score"] == sc and r["batch"] == batch and r["model"] == model
                      and r["m"] == m]
                log(f"  {sc}: best {min(ts) * 1e3:.1f} us" if ts else f"  {sc}: none ran")
            log(f"sweep lookat {model} m={m} bits={bits} B={batch} ctx={ctx}: best {t * 1e3:.1f} us with "
                + str({k: str(v) for k, v in best.items()}))
            del sh, cache
    if not dense:
        return out
    for model in sorted({c[0] for c in cells}):
        for batch, ctx in shapes:
            sh = Shape(model, batch, ctx, device, gen)
            best = dict(dense_triton.DEFAULTS)
            for stage in ([{"block_n": bn, "num_warps": nw, "num_stages": ns} for bn in (32, 64, 128)
                           for nw in (4, 8) for ns in (1, 3)],
                          [{"num_stages": ns} for ns in (2, 4)],
                          [{"programs_per_sm": p} for p in (1, 2, 4, 8)]):
                results = []
                for over in stage:
                    cfg = {**best, **over}
                    try:
                        t = bench_ms(sh.dense_fn(**cfg), True)
                    except Exception as e:
                        log(f"  config {over} failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    results.append((t, over))
                    out.append({"op": "dense_triton", "model": model, "batch": batch, "context": ctx,
                                **{k: str(v) for k, v in cfg.items()}, "ms": t})
                if results:
                    t, over = min(results, key=lambda r: r[0])
                    best.update(over)
            log(f"sweep dense {model} B={batch} ctx={ctx}: best {t * 1e3:.1f} us with {best}")
            del sh
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------ report


def write_report(out: Path, meta: dict, checks: list[dict], rows: list[dict], peak: float) -> None:
    for r in rows:
        if "ms" in r:
            r["us"] = r["ms"] * 1e3
            r["gb_s"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
            r["pct_peak"] = 100 * r["gb_s"] / peak if not math.isnan(peak) else None
    (out / "results.json").write_text(json.dumps({"meta": meta, "correctness": checks, "timings": rows}, indent=1))
    lines = [f"# LOOKAT Triton decode kernels — {meta['gpu']}", "",
             f"- GPU: {meta['gpu']} ({meta['sms']} SMs); peak bandwidth used for %: {meta['peak_label']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, python {meta['python']}",
             f"- date: {meta['date']}; command: `{meta['command']}`",
             "- times: `triton.testing.do_bench` median, L2 flushed before each repetition; LOOKAT = table build"
             " + attention + partition combine (one op, no host sync); every request has the full context.",
             "- bytes: cache rows read (+ block table, query, output); LOOKAT also its tables (written + read"
             " once). GB/s = bytes / time; x dense / x SDPA = baseline time / LOOKAT time.",
             f"- launch parameters (lookat_triton.tuned): {meta['lookat_defaults']};"
             f" dense {meta['dense_defaults']}",
             "- lookat-adc: per-request ADC tables (built inside the op) gathered by code; lookat-rebuilt*: no"
             " tables, keys rebuilt from bf16 codebooks (a per-layer constant, prepared once) and scored on tensor"
             " cores. Both read m code bytes per token and key.", "",
             "## Correctness (relative error vs the PyTorch references, fp32 on CPU)", "",
             "| op | model | m | value bits | LUT | splits | rel. err |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['op']} | {c['model']} | {c.get('m', '')} | {c.get('value_bits', '')} | "
                     f"{c.get('lut', '')} | {c.get('splits', '')} | {c['rel_err']:.2e} |")
    lines += ["", "## Timings", "",
              "| model | batch | context | op | m | value bits | row B | time (us) | x dense | x SDPA | MB read |"
              " GB/s | % peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "skipped":
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | skipped: {r['why']} |"
                         + " |" * 9)
            continue
        pct = f"{r['pct_peak']:.0f}" if r.get("pct_peak") is not None else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['op']} | {r.get('m', '')} | "
                     f"{r.get('value_bits', '')} | {r.get('row_bytes', '')} | {r['us']:.1f} | "
                     f"{r['vs_dense_triton']:.2f} | {r['vs_sdpa']:.2f} | " if r["op"].startswith("lookat") else
                     f"| {r['model']} | {r['batch']} | {r['context']} | {r['op']} | | | | {r['us']:.1f} | | | ")
        lines[-1] += f"{r['bytes'] / 1e6:.1f} | {r['gb_s']:.0f} | {pct} |"
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    look = [r for r in rows if r["op"].startswith("lookat") and r["value_bits"] == 4]
    models = sorted({r["model"] for r in look})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        m = min(r["m"] for r in look if r["model"] == model)
        for batch in sorted({r["batch"] for r in look if r["model"] == model}):
            best = {}
            for r in look:
                if r["model"] == model and r["batch"] == batch and r["m"] == m:
                    best[r["context"]] = max(best.get(r["context"], 0.0), r["vs_dense_triton"])
            ctxs = sorted(best)
            ax.plot(ctxs, [best[c] for c in ctxs], marker="o", label=f"B={batch}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{model}: LOOKAT (m={m}, int4 values, best variant) vs dense", xlabel="context tokens",
               ylabel="speed-up (x)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer cells, shorter timings (a smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch parameters (sweep.json)")
    ap.add_argument("--sweep-no-dense", action="store_true", help="sweep the LOOKAT kernel only")
    ap.add_argument("--sweep-cells", nargs="+", metavar="MODEL:M:BITS",
                    help="cells of the sweep (default: " + " ".join(f"{a}:{b}:{c}" for a, b, c in SWEEP_CELLS) + ")")
    ap.add_argument("--sweep-shapes", nargs="+", metavar="BATCH:CONTEXT",
                    help="shapes of the sweep (default: " + " ".join(f"{a}:{b}" for a, b in SWEEP_SHAPES) + ")")
    ap.add_argument("--no-bench", action="store_true", help="correctness (and sweep) only")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--scores", nargs="+", default=list(lookat_triton.SCORES), choices=list(lookat_triton.SCORES),
                    help="LOOKAT scoring variants to time (lookat_triton.lookat_decode's `score`)")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda"
    started = time.time()
    log_path = args.out / "log.txt"

    def log(msg: str) -> None:
        line = f"[{time.time() - started:7.1f}s] {msg}"
        print(line, flush=True)
        with log_path.open("a") as f:
            f.write(line + "\n")

    props = torch.cuda.get_device_properties(0)
    peak, peak_label = peak_bandwidth(props.name)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "peak_gb_s": peak, "peak_label": peak_label,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.kernels_lookat " + " ".join(sys.argv[1:] if argv is None else argv),
            "lookat_defaults": {f"{sc}, head_dim {d}": {k: str(v) for k, v in lookat_triton.tuned(d, 8, 4, 1, sc).items()
                                                        if k != "score"}
                                for sc in args.scores for d in sorted({MODELS[mm]["d"] for mm in args.models})},
            "dense_defaults": dense_triton.DEFAULTS}
    log(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; {peak_label}")
    checks = [] if args.no_check else correctness(device, args.models, args.scores, args.quick)
    worst = max([c["rel_err"] for c in checks] or [0.0])
    for c in checks:
        log(f"check {c}")
    log(f"correctness: {len(checks)} checks, worst relative error {worst:.2e}")
    if args.sweep:
        cells = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.sweep_cells or []]
        shapes = [tuple(int(x) for x in c.split(":")) for c in args.sweep_shapes or []]
        sw = sweep(device, log, dense=not args.sweep_no_dense, cells=cells, shapes=shapes)
        (args.out / "sweep.json").write_text(json.dumps(sw, indent=0))
    rows = []
    if not args.no_bench:
        batches = args.batches if not args.quick else [1, 64]
        contexts = args.contexts if not args.quick else [32768]
        rows = run_timings(device, args.models, batches, contexts, MS, BITS, args.scores, args.quick, log,
                           lambda rows: write_report(args.out, meta, checks, [dict(r) for r in rows], peak))
    write_report(args.out, meta, checks, rows, peak)
    if rows:
        plot(args.out, rows)
    log(f"done in {time.time() - started:.0f}s -> {args.out}")
    return 0 if worst < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
