"""Key-format fidelity sweep: PQ (LOOKAT) keys against scalar-quantized keys, on every
layer of a model, at long context.

    python -m benchmarks.fidelity_sweep --model qwen2.5-coder-0.5b --lengths 512,2048,8192,16384 \\
        --out results/2026-11-24/fidelity/qwen2.5-coder-0.5b

What is measured, per layer and context length, for each key format:

* Keys are captured exactly as the KV cache holds them (post-RoPE, one per KV head) by
  a transformers forward whose attention function records K, V and the few queries
  needed, then runs transformers' SDPA attention (causal, no materialised mask). Only
  the keys are replaced; values stay exact, so the numbers isolate the key format.
* One forward at the longest length: a shorter length L uses the first L tokens'
  keys/values and the queries at positions L-64 .. L-1 (attention is causal, so these
  are what a forward over the first L tokens computes).
* Metrics are those of :func:`vllm_kvcompress.offline.capture.compare` (output cosine,
  attention KL, logit Spearman, top-32 overlap) over the last ``--last`` (64) queries
  of each length, all query heads; Spearman and top-k over the keys every one of those
  queries sees. Per layer: the mean over (head, query); reported: the mean over layers
  and the worst layer.
* PQ codebooks (K = 256 per subspace, :func:`vllm_kvcompress.offline.pq.fit_codebooks`, seed
  ``--seed`` + layer as ``vllm_kvcompress.offline.calibrate``) are fitted on ``--calib-tokens``
  tokens of Python standard-library docstrings (the calibrate command's text); the
  evaluation text is different: the Paul Graham essays that ship with RULER.

Key formats, at their bytes per token per KV head (bf16 keys: ``2 * head_dim``):

* ``pq-m{m}-{grouping}``: m one-byte codes; subspaces of contiguous dims, or
  ``rope_pairs`` (whole RoPE rotation pairs per subspace, see
  :func:`vllm_kvcompress.offline.pq.subspace_dims`). Codebooks (``Hkv * 256 * head_dim``
  floats per layer) are shared by all tokens and not counted.
* ``int{8,4,2}``: per-token, per-head asymmetric integers (min/max over the head's
  dims), with an fp16 scale and fp16 minimum (4 bytes); dequantized to fp32 before the
  dot product.
* ``int{4,2}-ch32``: KIVI-style per-channel asymmetric integers over groups of 32
  tokens (fp16 scale and minimum per group and dim: ``4 * head_dim / 32`` bytes per
  token), dequantized. Per-token ranges suffer from the large constant offsets some
  key dims carry (k_proj bias; ~145 in Qwen2.5-0.5B layer 0), per-channel ones do not.
* ``fp8-e4m3``: vLLM's ``--kv-cache-dtype fp8`` with scale 1 (``head_dim`` bytes).
* ``int{8,4}-prerope``: KVQuant-style static per-channel integers on the keys *before*
  RoPE (each key turned back by its position), with one (minimum, maximum) per (layer, KV
  head, channel) taken from the calibration keys, then RoPE applied again: no per-token or
  per-group scale (``head_dim * bits / 8`` bytes), and no dependence on position, since RoPE
  is what spreads a channel's range over its rotation pair.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kvcompress.offline.pq import assign, fit_codebooks, subspace_dims

RECORDER_IMPL = "kvcompress_fidelity_sweep"
METRICS = ("output_cosine", "attention_kl", "logit_spearman", "topk_overlap")
HIGHER_IS_BETTER = {"output_cosine": True, "attention_kl": False, "logit_spearman": True, "topk_overlap": True}


# ---------------------------------------------------------------- key formats

@dataclass(frozen=True)
class KeyFormat:
    name: str
    kind: str  # "pq" | "int" | "fp8" | "prerope"
    bytes_per_token: float  # per KV head
    m: int = 0
    grouping: str = ""  # pq: contiguous | rope_pairs; int: token | channel
    bits: int = 0
    group: int = 0  # int channel: tokens per (scale, minimum)
    calib: str = ""  # pq: "plain" | "rope-aug" (calibration keys moved to random positions)


def key_formats(head_dim: int, ms: list[int] | None = None, groupings: tuple[str, ...] = ("contiguous", "rope_pairs"),
                int_bits: tuple[int, ...] = (8, 4, 2), channel_bits: tuple[int, ...] = (4, 2), channel_group: int = 32,
                fp8: bool = True, pq_calibs: tuple[str, ...] = ("plain",),
                prerope_bits: tuple[int, ...] = ()) -> list[KeyFormat]:
    """Formats in the sweep, fewest bytes first. Default m: 2, 4, ... up to head_dim / 2."""
    if ms is None:
        ms = [2 ** i for i in range(1, int(math.log2(head_dim)))]
    formats = []
    for calib in pq_calibs:
        suffix = {"plain": "", "rope-aug": "-ropeaug"}[calib]
        for m in ms:
            for grouping in groupings:
                if grouping == "rope_pairs" and (head_dim // m) % 2:
                    continue
                formats.append(KeyFormat(f"pq-m{m}-{grouping}{suffix}", "pq", float(m), m=m, grouping=grouping, calib=calib))
    formats += [KeyFormat(f"int{b}", "int", head_dim * b / 8 + 4, grouping="token", bits=b) for b in int_bits]
    formats += [KeyFormat(f"int{b}-ch{channel_group}", "int", head_dim * b / 8 + 4 * head_dim / channel_group,
                          grouping="channel", bits=b, group=channel_group) for b in channel_bits]
    if fp8:
        formats.append(KeyFormat("fp8-e4m3", "fp8", float(head_dim)))
    formats += [KeyFormat(f"int{b}-prerope", "prerope", head_dim * b / 8, grouping="channel", bits=b)
                for b in prerope_bits]
    return sorted(formats, key=lambda f: (f.bytes_per_token, f.name))


def _asymmetric(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round-trip through ``bits``-bit asymmetric integers, one (fp16 scale, fp16 minimum)
    per slice along ``dim``."""
    levels = 2 ** bits - 1
    low = x.amin(dim, keepdim=True).half().float()
    scale = ((x.amax(dim, keepdim=True) - low) / levels).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - low) / scale).clamp_(0, levels) * scale + low


def int_keys(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric ``bits``-bit keys (min/max over the head's dims, fp16 scale
    and minimum), dequantized to fp32."""
    return _asymmetric(keys.float(), bits, -1)


def int_channel_keys(keys: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """KIVI-style keys ``[Hkv, T, D]``: per-channel asymmetric ``bits``-bit integers over
    groups of ``group`` consecutive tokens (fp16 scale and minimum per group and dim; a
    last partial group is its own group), dequantized to fp32."""
    x = keys.float()
    full = x.shape[1] // group * group
    parts = [_asymmetric(x[:, :full].unflatten(1, (full // group, group)), bits, -2).flatten(1, 2)]
    if full < x.shape[1]:
        parts.append(_asymmetric(x[:, full:], bits, -2))
    return torch.cat(parts, 1)


def prerope_static_keys(keys: torch.Tensor, calibration: torch.Tensor, bits: int, theta: float) -> torch.Tensor:
    """``keys [Hkv, T, D]`` (post-RoPE, key t at position t) through ``bits``-bit integers
    per channel of the pre-RoPE keys, the range per (KV head, channel) being the min/max of
    ``calibration`` (post-RoPE keys at their own positions, likewise turned back), then
    RoPE again; fp32."""
    from vllm_kvcompress.offline.rope import rotate

    def unrotated(x):
        return rotate(x.float(), -torch.arange(x.shape[1]), theta)

    reference = unrotated(calibration)
    low, high = reference.amin(1, keepdim=True), reference.amax(1, keepdim=True)
    levels = 2 ** bits - 1
    scale = torch.where(high > low, (high - low) / levels, torch.ones_like(high))
    codes = torch.round((unrotated(keys) - low) / scale).clamp_(0, levels)
    return rotate(codes * scale + low, torch.arange(keys.shape[1]), theta)


def fp8_keys(keys: torch.Tensor) -> torch.Tensor:
    """What vLLM's --kv-cache-dtype fp8 (e4m3, scale 1) stores, as fp32."""
    return keys.to(torch.float8_e4m3fn).float()


def pq_keys(keys: torch.Tensor, codebooks: torch.Tensor, dims: torch.Tensor | None = None) -> torch.Tensor:
    """Keys ``[Hkv, T, D]`` rebuilt from their nearest centroids (``codebooks[Hkv, m, K, s]``
    over the dims ``dims[m, s]``), fp32, in the original dim order."""
    heads, tokens, d = keys.shape
    m = codebooks.shape[1]
    x = keys.float()
    if dims is not None:
        x = x[..., dims.flatten()]
    sub = x.unflatten(-1, (m, d // m)).permute(0, 2, 1, 3).flatten(0, 1)  # [Hkv*m, T, s]
    flat = codebooks.float().flatten(0, 1)  # [Hkv*m, K, s]
    codes = assign(sub.contiguous(), flat)  # [Hkv*m, T]
    rebuilt = flat.gather(1, codes.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))  # [Hkv*m, T, s]
    rebuilt = rebuilt.unflatten(0, (heads, m)).permute(0, 2, 1, 3).flatten(-2)  # [Hkv, T, D]
    if dims is not None:
        rebuilt = rebuilt[..., torch.argsort(dims.flatten())]
    return rebuilt


# ---------------------------------------------------------------- metrics

def _ranks(x: torch.Tensor) -> torch.Tensor:
    """:func:`vllm_kvcompress.offline.fidelity._ranks` (ties get their average rank), sorting fp32
    values directly (the same order as after its fp64 cast) with an unstable sort (tied
    values share one average rank, so their order does not matter): faster."""
    sorted_x, order = x.sort(dim=-1)
    n = x.shape[-1]
    positions = torch.arange(n, dtype=torch.float64).expand(x.shape)
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    run_id = new_run.long().cumsum(-1) - 1
    run_sum = torch.zeros(x.shape, dtype=torch.float64).scatter_add_(-1, run_id, positions)
    run_len = torch.zeros(x.shape, dtype=torch.float64).scatter_add_(-1, run_id, torch.ones_like(positions))
    avg = (run_sum / run_len.clamp(min=1)).gather(-1, run_id)
    return torch.empty_like(avg).scatter_(-1, order, avg)


def _centered(r: torch.Tensor) -> torch.Tensor:
    r = r - r.mean(-1, keepdim=True)
    return r / r.norm(dim=-1, keepdim=True)


class Reference:
    """The exact attention of one layer at one length, kept to score many key formats
    against (:func:`vllm_kvcompress.offline.capture.compare`'s metrics, reference parts once).

    ``q[H, n, D]``: the queries at positions ``T-n .. T-1``; ``k, v[Hkv, T, D]``."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, top_k: int = 32):
        heads, n, _ = q.shape
        tokens = k.shape[1]
        self.q, self.scale, self.group, self.top_k = q.float(), scale, heads // k.shape[0], top_k
        self.mask = torch.arange(tokens).unsqueeze(0) <= torch.arange(tokens - n, tokens).unsqueeze(1)  # [n, T]
        self.visible = tokens - n + 1  # keys 0 .. T-n are seen by every query
        self.v = v.repeat_interleave(self.group, dim=0).float()
        logits = self.logits(k)
        self.output = self._output(logits)
        self.log_p = torch.log_softmax(logits.double().masked_fill(~self.mask, float("-inf")), -1)
        self.finite, self.p = self.log_p.isfinite(), self.log_p.exp()
        self.ranks = _centered(_ranks(logits[..., : self.visible]))
        self.top = logits[..., : self.visible].topk(top_k, dim=-1).indices

    def logits(self, k: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(self.group, dim=0).float()
        return (self.q @ k.transpose(-1, -2)) * self.scale

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.masked_fill(~self.mask, float("-inf")), -1) @ self.v

    def compare(self, k_new: torch.Tensor) -> dict[str, dict[str, float]]:
        """Metrics of attention over ``k_new`` (values exact) against the reference."""
        logits = self.logits(k_new)
        cos = torch.nn.functional.cosine_similarity(self.output.double(), self._output(logits).double(), dim=-1)
        log_q = torch.log_softmax(logits.double().masked_fill(~self.mask, float("-inf")), -1)
        kl = torch.where(self.finite, self.p * (self.log_p - log_q), torch.zeros_like(log_q)).sum(-1)
        visible = logits[..., : self.visible]
        rho = (self.ranks * _centered(_ranks(visible))).sum(-1)
        top = visible.topk(self.top_k, dim=-1).indices
        hits = (self.top.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).double().sum(-1) / self.top_k
        return {
            "output_cosine": {"mean": float(cos.mean()), "min": float(cos.min())},
            "attention_kl": {"mean": float(kl.mean()), "max": float(kl.max())},
            "logit_spearman": {"mean": float(rho.mean()), "min": float(rho.min())},
            "topk_overlap": {"mean": float(hits.mean()), "min": float(hits.min())},
        }


def summarize(per_layer: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over layers of each metric's per-layer mean, and the worst layer's mean."""
    out = {"mean": {}, "worst_layer": {}, "worst_layer_index": {}}
    for metric in METRICS:
        values = [layer[metric]["mean"] for layer in per_layer]
        worst = (min if HIGHER_IS_BETTER[metric] else max)(range(len(values)), key=values.__getitem__)
        out["mean"][metric] = sum(values) / len(values)
        out["worst_layer"][metric] = values[worst]
        out["worst_layer_index"][metric] = per_layer[worst].get("layer", worst)
    return out


# ---------------------------------------------------------------- capture

_STORE: dict = {"layers": {}, "positions": None}


def _record(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    entry = {"k": key[0].detach().clone()}  # [Hkv, T, D], as the cache holds it
    if _STORE["positions"] is not None:
        entry["v"] = value[0].detach().clone()
        entry["q"] = query[0, :, _STORE["positions"]].detach().clone()  # [H, P, D]
        entry["scale"] = module.scaling
    _STORE["layers"][module.layer_idx] = entry
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def load_model(model_dir: str):
    """The model in bf16 with the recording attention (SDPA underneath)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(RECORDER_IMPL, _record)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=RECORDER_IMPL).eval()


def capture(model, token_ids: list[int], positions: torch.Tensor | None) -> dict[int, dict]:
    """One forward; per layer the keys, and (with ``positions``) the values and the
    queries at ``positions``. No logits beyond the last token are computed."""
    _STORE.update(layers={}, positions=positions)
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]), use_cache=False, logits_to_keep=1)
        return dict(sorted(_STORE["layers"].items()))
    finally:
        _STORE.update(layers={}, positions=None)


def query_positions(lengths: list[int], last: int) -> tuple[torch.Tensor, dict[int, slice]]:
    """Positions of the last ``last`` queries of every length (sorted), and where each
    length's queries sit in that list."""
    positions = sorted({p for length in lengths for p in range(length - last, length)})
    where = {p: i for i, p in enumerate(positions)}
    return torch.tensor(positions), {n: slice(where[n - last], where[n - 1] + 1) for n in lengths}


def evaluation_ids(tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of the Paul Graham essays (RULER's copy)."""
    from vllm_kvcompress.offline.corpus import essay_sentences

    sentences, chars = essay_sentences(), 8 * tokens
    while True:
        text, total = [], 0
        for sentence in sentences:
            text.append(sentence)
            total += len(sentence) + 1
            if total > chars:
                break
        ids = tokenizer(" ".join(text), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return ids[:tokens]
        if total <= chars:
            raise ValueError(f"the essays have only {len(ids)} tokens, {tokens} asked")
        chars *= 2


# ---------------------------------------------------------------- report

def write_markdown(result: dict, path: Path) -> None:
    lengths = [str(n) for n in result["lengths"]]
    bf16 = 2 * result["head_dim"]
    lines = [
        f"# Key-format fidelity: {result['model']}",
        "",
        f"Every layer ({result['num_layers']}), {result['num_kv_heads']} KV heads, head_dim {result['head_dim']}. "
        f"Evaluation text: {result['evaluation_text']}; PQ codebooks fitted on {result['calibration']['tokens']} "
        f"tokens of {result['calibration']['text']}. Values exact (keys only). Metrics over the last "
        f"{result['last_queries']} queries of each length (all query heads), Spearman / top-{result['top_k']} over "
        "the keys all of them see; per layer the mean, then averaged over layers (worst layer in brackets).",
        "",
        f"Bytes per token per KV head; bf16 keys: {bf16}. PQ: m one-byte codes (codebooks not counted). "
        + (result["calibration"].get("rope_aug", "") + ". " if any(f.get("calib") == "rope-aug" for f in result["formats"]) else "")
        + "intN: per-token asymmetric, fp16 scale + min (4 bytes), dequantized before the dot product. "
        "intN-chG: per-channel asymmetric over groups of G tokens (KIVI-style; fp16 scale + min per group and dim, "
        "4 * head_dim / G bytes per token), dequantized. fp8: e4m3, scale 1."
        + (" intN-prerope: static per-channel integers on the pre-RoPE keys, range per (layer, KV head, channel) "
           "from the calibration keys, RoPE re-applied (no scales stored per token)."
           if any(f["kind"] == "prerope" for f in result["formats"]) else ""),
        "",
        "## Output cosine (mean over layers, worst layer)",
        "",
        "| format | bytes | compression | " + " | ".join(f"{n} tok" for n in lengths) + " |",
        "|---|---:|---:|" + "---:|" * len(lengths),
    ]
    for fmt in result["formats"]:
        cells = []
        for n in lengths:
            r = result["results"][fmt["name"]].get(n)
            cells.append("" if r is None else f"{r['mean']['output_cosine']:.4f} ({r['worst_layer']['output_cosine']:.4f})")
        lines.append(f"| {fmt['name']} | {fmt['bytes_per_token']:g} | {bf16 / fmt['bytes_per_token']:.1f}x | " + " | ".join(cells) + " |")
    for n in lengths:
        lines += ["", f"## {n} tokens: all metrics (mean over layers, worst layer)", "",
                  "| format | bytes | output cosine | attention KL | logit Spearman | top-32 overlap |",
                  "|---|---:|---:|---:|---:|---:|"]
        for fmt in result["formats"]:
            r = result["results"][fmt["name"]].get(n)
            if r is None:
                continue
            m, w = r["mean"], r["worst_layer"]
            lines.append(f"| {fmt['name']} | {fmt['bytes_per_token']:g} | {m['output_cosine']:.4f} ({w['output_cosine']:.4f}) | "
                         f"{m['attention_kl']:.2e} ({w['attention_kl']:.2e}) | {m['logit_spearman']:.4f} ({w['logit_spearman']:.4f}) | "
                         f"{m['topk_overlap']:.3f} ({w['topk_overlap']:.3f}) |")
    lines += ["", f"Command: `{result['command']}`", f"Run time: {result['timing']}", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> None:
    """Output cosine (and 1 - cosine, log) vs key bytes: colour = length, line/marker =
    format family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    families = [("pq", "contiguous", "plain", "-", "o", "PQ (contiguous)"),
                ("pq", "rope_pairs", "plain", "--", "s", "PQ (rope_pairs)"),
                ("pq", "contiguous", "rope-aug", (0, (5, 1, 1, 1)), "P", "PQ ropeaug (contiguous)"),
                ("pq", "rope_pairs", "rope-aug", (0, (1, 1)), "X", "PQ ropeaug (rope_pairs)"),
                ("int", "token", "", ":", "^", "INT8/4/2 per token"),
                ("prerope", "channel", "", (0, (3, 1)), "*", "INT8/4 pre-RoPE static per channel"),
                ("int", "channel", "", "-.", "v", "INT4/2 per channel (KIVI)"),
                ("fp8", "", "", "none", "D", "fp8 e4m3")]
    lengths = [str(n) for n in result["lengths"]]
    present = set()
    for ax, transform, label in ((axes[0], lambda c: c, "output cosine"), (axes[1], lambda c: 1 - c, "1 - output cosine")):
        for i, n in enumerate(lengths):
            for kind, grouping, calib, style, marker, name in families:
                fmts = [f for f in result["formats"] if f["kind"] == kind and f.get("grouping", "") == grouping
                        and (f.get("calib") or ("plain" if kind == "pq" else "")) == calib
                        and n in result["results"][f["name"]]]
                if not fmts:
                    continue
                present.add(name)
                xs = [f["bytes_per_token"] for f in fmts]
                ys = [transform(result["results"][f["name"]][n]["mean"]["output_cosine"]) for f in fmts]
                ax.plot(xs, ys, linestyle=style, marker=marker, color=colors[i % len(colors)], markersize=5, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="key bytes per token per KV head (bf16: %d)" % (2 * result["head_dim"]), ylabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[1].set_yscale("log")
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2, label=f"{n} tokens") for i, n in enumerate(lengths)]
    handles += [Line2D([], [], color="gray", linestyle=style, marker=marker, label=name)
                for _, _, _, style, marker, name in families if name in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{result['model']}: attention output cosine vs key bytes "
                 f"(mean over {result['num_layers']} layers, last {result['last_queries']} queries, values exact)")
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(handles) - 1) // 6) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def redraw(folder: Path) -> None:
    """Rewrite results.md and the plot from a folder's results.json."""
    result = json.loads((folder / "results.json").read_text())
    write_markdown(result, folder / "results.md")
    write_plot(result, folder / "output_cosine_vs_bytes.png")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvcompress.offline.models import MODELS, ensure_model
    from vllm_kvcompress.offline.prompts import stdlib_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"one of {sorted(MODELS)} or a model folder")
    parser.add_argument("--redraw", action="store_true", help="only rewrite results.md and the plot from --out/results.json")
    parser.add_argument("--lengths", default="512,2048,8192,16384")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--ms", default=None, help="PQ subspace counts (default 2, 4, ... head_dim/2)")
    parser.add_argument("--groupings", default="contiguous,rope_pairs")
    parser.add_argument("--pq-calib", default="plain", help="comma-separated: plain (calibration keys at the text's "
                        "positions), rope-aug (--rope-aug-copies copies of each moved to random positions below "
                        "--rope-aug-max-position, vllm_kvcompress.offline.rope.spread_positions)")
    parser.add_argument("--rope-aug-max-position", type=int, default=None, help="default: the longest length")
    parser.add_argument("--rope-aug-copies", type=int, default=2)
    parser.add_argument("--int-bits", default="8,4,2", help="per-token integer keys")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--channel-bits", default="4,2", help="per-channel (KIVI-style) integer keys")
    parser.add_argument("--channel-group", type=int, default=32, help="tokens per per-channel scale")
    parser.add_argument("--prerope-bits", default="", help="static per-channel pre-RoPE integer keys, e.g. 8,4")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--last", type=int, default=64, help="queries scored per length (the last ones)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.redraw:
        redraw(Path(args.out))
        return json.loads((Path(args.out) / "results.json").read_text())
    if not args.model:
        parser.error("--model is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model_dir = str(ensure_model(args.model)) if args.model in MODELS else args.model
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths = sorted(int(x) for x in args.lengths.split(","))
    ms = [int(x) for x in args.ms.split(",")] if args.ms else None
    formats = key_formats(head_dim, ms, tuple(args.groupings.split(",")) if args.groupings else (),
                          tuple(int(b) for b in args.int_bits.split(",") if b),
                          tuple(int(b) for b in args.channel_bits.split(",") if b), args.channel_group,
                          not args.no_fp8, tuple(args.pq_calib.split(",")),
                          tuple(int(b) for b in args.prerope_bits.split(",") if b))
    aug_max = args.rope_aug_max_position or lengths[-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(model_dir)
    t = time.time()
    calib_ids = tokenizer(stdlib_text(), add_special_tokens=False)["input_ids"][: args.calib_tokens]
    calibration = {i: e["k"] for i, e in capture(model, calib_ids, None).items()}
    if any(f.calib == "rope-aug" or f.kind == "prerope" for f in formats):
        from vllm_kvcompress.offline.rope import check_default_rope, spread_positions

        theta = check_default_rope(config)
    calib_s = time.time() - t
    t = time.time()
    eval_ids = evaluation_ids(tokenizer, lengths[-1])
    positions, where = query_positions(lengths, args.last)
    print(f"forward over {len(eval_ids)} tokens ...", file=sys.stderr)
    captured = capture(model, eval_ids, positions)
    forward_s = time.time() - t
    del model
    gc.collect()

    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(captured)
    per_layer: dict[str, dict[str, list]] = {f.name: {str(n): [] for n in lengths} for f in formats}
    fit_s = score_s = 0.0
    bar = tqdm(total=len(layers) * len(formats), desc="layer x format", unit="fmt", file=sys.stderr)
    for layer in layers:
        entry = captured[layer]
        refs = {n: Reference(entry["q"][:, where[n]], entry["k"][:, :n], entry["v"][:, :n], entry["scale"], args.top_k)
                for n in lengths}
        calib_keys = {"plain": calibration[layer]}
        if any(f.calib == "rope-aug" for f in formats):
            calib_keys["rope-aug"] = spread_positions(calibration[layer], theta, aug_max, args.rope_aug_copies,
                                                      torch.Generator().manual_seed(args.seed + layer))
        for fmt in formats:
            bar.set_postfix_str(f"layer {layer} {fmt.name}")
            t = time.time()
            if fmt.kind == "pq":
                dims = subspace_dims(head_dim, fmt.m, fmt.grouping)
                codebooks = fit_codebooks(calib_keys[fmt.calib], m=fmt.m, iters=args.iters, seed=args.seed + layer, dims=dims)
                keys = pq_keys(entry["k"], codebooks, dims)
            elif fmt.kind == "prerope":
                keys = prerope_static_keys(entry["k"], calibration[layer], fmt.bits, theta)
            elif fmt.kind == "int" and fmt.grouping == "channel":
                keys = int_channel_keys(entry["k"], fmt.bits, fmt.group)
            elif fmt.kind == "int":
                keys = int_keys(entry["k"], fmt.bits)
            else:
                keys = fp8_keys(entry["k"])
            fit_s += time.time() - t
            t = time.time()
            for n in lengths:
                per_layer[fmt.name][str(n)].append({"layer": layer, **refs[n].compare(keys[:, :n])})
            score_s += time.time() - t
            bar.update()
        del refs
    bar.close()

    result = {
        "model": args.model, "model_dir": model_dir, "head_dim": head_dim, "num_layers": len(layers), "layers": layers,
        "num_kv_heads": config.num_key_value_heads, "num_heads": config.num_attention_heads,
        "lengths": lengths, "last_queries": args.last, "top_k": args.top_k,
        "query_sampling": f"the last {args.last} query positions of each length, all {config.num_attention_heads} query heads; "
                          f"one forward over {lengths[-1]} tokens, shorter lengths are its prefixes",
        "evaluation_text": f"Paul Graham essays (RULER), first {lengths[-1]} tokens",
        "calibration": {"text": "Python stdlib docstrings (vllm_kvcompress.offline.calibrate)", "tokens": len(calib_ids),
                        "K": 256, "iters": args.iters, "seed": args.seed,
                        "rope_aug": f"-ropeaug formats: {args.rope_aug_copies} copies of the {len(calib_ids)} calibration "
                                    f"keys, each key moved (exact RoPE rotation) to a uniformly random position in "
                                    f"[0, {aug_max})"},
        "formats": [{**asdict(f), "compression_vs_bf16": 2 * head_dim / f.bytes_per_token} for f in formats],
        "results": {name: {n: {**summarize(rows), "per_layer": rows} for n, rows in by_len.items()}
                    for name, by_len in per_layer.items()},
        "timing": {"calibration_forward_s": round(calib_s, 1), "evaluation_forward_s": round(forward_s, 1),
                   "quantize_s": round(fit_s, 1), "metrics_s": round(score_s, 1),
                   "total_s": round(time.time() - started, 1), "torch_threads": torch.get_num_threads()},
        "command": "python -m benchmarks.fidelity_sweep " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "results.md")
    write_plot(result, out / "output_cosine_vs_bytes.png")
    print(f"wrote {out}/results.json, results.md, output_cosine_vs_bytes.png ({result['timing']['total_s']} s)")
    return result


if __name__ == "__main__":
    main()
