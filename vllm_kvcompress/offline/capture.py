"""Real Q/K/V from a model's attention layers, exactly as attention sees them (after
RoPE), for attention-fidelity measurements and calibration.

Engine-neutral: a transformers forward pass whose attention function records its
inputs, then runs transformers' own SDPA attention. Keys and values come out as a
KV cache would store them (post-RoPE keys, one per KV head).

    python -m vllm_kvcompress.offline.capture --model smollm2-135m --tokens 1024 --pq 8,16,32
    # per layer: fidelity of fp8 K/V, and of PQ keys with m = 8, 16, 32 subspaces
"""

from __future__ import annotations

import argparse

import torch

from vllm_kvcompress.offline import fidelity
from vllm_kvcompress.kernels.pq_ref import decode, encode
from vllm_kvcompress.offline.pq import fit_codebooks

CAPTURE_IMPL = "kvcompress_capture"


def _register(store: dict) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in store["layers"]:
            # [batch=1, heads, tokens, head_dim] -> [heads, tokens, head_dim]
            store["qkv"][module.layer_idx] = {"q": query[0].detach().clone(), "k": key[0].detach().clone(),
                                              "v": value[0].detach().clone(), "scale": module.scaling}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_IMPL, capture)


def capture_qkv(model_dir: str, token_ids: list[int], layers: list[int] | None = None,
                dtype: torch.dtype = torch.bfloat16) -> dict[int, dict]:
    """{layer: {"q": [H, T, D], "k": [Hkv, T, D], "v": [Hkv, T, D], "scale": float}}."""
    from transformers import AutoModelForCausalLM

    store: dict = {"qkv": {}, "layers": set()}
    _register(store)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=CAPTURE_IMPL)
    store["layers"] = set(range(model.config.num_hidden_layers)) if layers is None else set(layers)
    with torch.no_grad():
        model(torch.tensor([token_ids]), use_cache=False)
    return dict(sorted(store["qkv"].items()))


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal logits of the last ``last`` queries over all keys, GQA-expanded, fp32:
    ([H, last, T], mask [last, T] with True = attend)."""
    heads, tokens = q.shape[0], k.shape[1]
    k = k.repeat_interleave(heads // k.shape[0], dim=0)
    logits = (q[:, -last:].float() @ k.float().transpose(-1, -2)) * scale
    rows = torch.arange(tokens - last, tokens).unsqueeze(1)
    return logits, torch.arange(tokens).unsqueeze(0) <= rows


def compare(layer: dict, k_new: torch.Tensor, v_new: torch.Tensor, last: int = 64, top_k: int = 32) -> dict:
    """Fidelity of attention over (k_new, v_new) against the captured (k, v), for the
    last ``last`` queries of one layer."""
    q, scale = layer["q"], layer["scale"]
    ref_logits, mask = attention_logits(q, layer["k"], scale, last)
    new_logits, _ = attention_logits(q, k_new, scale, last)
    heads = q.shape[0]

    def output(logits, v):
        v = v.repeat_interleave(heads // v.shape[0], dim=0).float()
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v

    visible = mask.all(0)  # keys every one of the last queries may see: rank over those
    return {
        "output_cosine": fidelity.output_cosine(output(ref_logits, layer["v"]), output(new_logits, v_new)),
        "attention_kl": fidelity.attention_kl(ref_logits, new_logits, mask),
        "logit_spearman": fidelity.spearman(ref_logits[..., visible], new_logits[..., visible]),
        f"top{top_k}_overlap": fidelity.topk_overlap(ref_logits[..., visible], new_logits[..., visible], top_k),
    }


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """What vLLM's --kv-cache-dtype fp8 (e4m3, scale 1) stores."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvcompress.offline.models import MODELS, ensure_model
    from vllm_kvcompress.offline.prompts import long_document_ids

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--pq", default="", help="comma-separated subspace counts m: also measure PQ keys "
                        "(K=256, codebooks fitted on a different 2K-token text)")
    parser.add_argument("--positions", default="0", help="comma-separated: fit PQ codebooks on calibration keys "
                        "moved to 2 random positions below this each (0 = where the text puts them)")
    args = parser.parse_args(argv)
    model_dir = str(ensure_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = long_document_ids(tokenizer, args.tokens, offset=20000)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    pq = [int(x) for x in args.pq.split(",") if x]
    spreads = [int(x) for x in args.positions.split(",") if x]
    calibration = capture_qkv(model_dir, long_document_ids(tokenizer, 2048, offset=5000), layers) if pq else {}
    report = {}
    for index, layer in capture_qkv(model_dir, ids, layers).items():
        report[index] = {"fp8 K/V": compare(layer, fp8_roundtrip(layer["k"]), fp8_roundtrip(layer["v"]))}
        for m in pq:
            for positions in spreads:
                train = calibration[index]["k"]
                if positions:
                    from vllm_kvcompress.offline.rope import check_default_rope, spread_positions

                    theta = check_default_rope(AutoConfig.from_pretrained(model_dir))
                    train = spread_positions(train, theta, positions, 2, torch.Generator().manual_seed(index))
                codebooks = fit_codebooks(train, m=m)
                keys = layer["k"].transpose(0, 1)  # [T, Hkv, D]
                rebuilt = decode(encode(keys, codebooks), codebooks).transpose(0, 1).to(layer["k"].dtype)
                name = f"PQ m={m}" + (f" pos<{positions}" if positions else "")
                report[index][name] = compare(layer, rebuilt, layer["v"])
        for name, r in report[index].items():
            print(f"layer {index:2d} {name:>19}: output cosine {r['output_cosine']['mean']:.4f} "
                  f"(min {r['output_cosine']['min']:.4f})  KL {r['attention_kl']['mean']:.2e}  "
                  f"spearman {r['logit_spearman']['mean']:.4f}  top32 {r['top32_overlap']['mean']:.3f}")
    return {"model": args.model, "tokens": len(ids), "report": report}


if __name__ == "__main__":
    main()
