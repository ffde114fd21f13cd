"""Key ranges for method ``kvquant``: per (layer, KV head, channel) the minimum and maximum
of the model's keys before RoPE, over calibration text the accuracy suite does not use
(Python standard-library docstrings, as :mod:`.calibrate`).

    python -m vllm_kvcompress.offline.key_ranges --model qwen2.5-coder-0.5b --out ranges.safetensors

Keys are captured as the cache holds them (post-RoPE, key t at position t) and turned back
by their positions, so the ranges do not depend on where a token sits. Output: safetensors,
one ``layer.N`` tensor ``[kv_heads, 2, head_dim]`` per layer and the model's signature in
the metadata, which start-up checks against the served model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_kvcompress.kernels.rope_ref import rotate
from vllm_kvcompress.methods.kvquant import RANGES_FORMAT, SHIPPED, plain_rope_theta
from vllm_kvcompress.methods.artefacts import model_signature


# Widen each calibrated range by this share of its width on both sides: text unlike the
# calibration text (chat formatting, special tokens) reaches past it, and a clamped key
# costs more than a coarser step (SmolLM2-135M's demo prompts: 24 -> 53 of 146 greedy tokens
# equal to bf16's before the first difference, int8 keys and values).
MARGIN = 0.25


def key_ranges(model_dir: str, tokens: int = 4096, margin: float = MARGIN) -> tuple[dict, dict]:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvcompress.offline.capture import capture_qkv
    from vllm_kvcompress.offline.prompts import stdlib_text

    config = AutoConfig.from_pretrained(model_dir)
    theta, why = plain_rope_theta(config)
    if why:
        raise SystemExit(f"kvquant needs plain RoPE; this model has {why}")
    ids = AutoTokenizer.from_pretrained(model_dir)(stdlib_text(), add_special_tokens=False)["input_ids"][:tokens]
    tensors = {}
    for layer, qkv in capture_qkv(model_dir, ids).items():
        keys = rotate(qkv["k"].float(), -torch.arange(qkv["k"].shape[1]), theta)  # [Hkv, T, D] at position 0
        low, high = keys.amin(1), keys.amax(1)
        widen = margin * (high - low)
        tensors[f"layer.{layer}"] = torch.stack([low - widen, high + widen], 1).contiguous()
    metadata = {"format": RANGES_FORMAT, "tokens": str(len(ids)), "text": "python stdlib docstrings",
                "margin": str(margin),
                "model": Path(model_dir).name, **model_signature(config)}
    return tensors, metadata


def ensure_key_ranges(model: str) -> Path:
    """The shipped range file of a known model, else one made once in the cache folder."""
    from safetensors.torch import save_file

    from vllm_kvcompress.offline.models import cache_root, ensure_model

    shipped = SHIPPED / f"{model}.safetensors"
    if shipped.exists():
        return shipped
    out = cache_root() / "key_ranges" / f"{model}.safetensors"
    if not out.exists():
        tensors, metadata = key_ranges(str(ensure_model(model)))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out.with_suffix(".tmp")), metadata=metadata)
        out.with_suffix(".tmp").rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from vllm_kvcompress.offline.models import MODELS, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"a model folder or one of {sorted(MODELS)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"widen each range by this share of its width on both sides (default {MARGIN})")
    args = parser.parse_args(argv)
    if args.margin < 0:
        parser.error(f"--margin must be >= 0, got {args.margin}")
    model_dir = str(ensure_model(args.model)) if args.model in MODELS else args.model
    tensors, metadata = key_ranges(model_dir, args.tokens, args.margin)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {metadata['num_layers']} layers, {metadata['tokens']} tokens")


if __name__ == "__main__":
    main()
