"""LOOKAT calibration: PQ codebooks for every (layer, KV head, subspace) of a model.

    python -m vllm_kvcompress.offline.calibrate --model smollm2-135m --m 32 --out codebooks.safetensors

Keys are captured exactly as the cache holds them (post-RoPE, one stream per KV head;
see :mod:`vllm_kvcompress.offline.capture`) over calibration text that is not used by the
accuracy suite (Python standard-library docstrings). k-means is deterministic for a
given ``--seed``. The output is safetensors: one ``layer.N`` tensor
``[kv_heads, m, K, head_dim / m]`` per layer, and metadata the engine checks against
the model it serves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vllm_kvcompress.methods.artefacts import model_signature
from vllm_kvcompress.methods.lookat.codebooks import FORMAT
from vllm_kvcompress.offline.rope import check_default_rope, spread_positions

def calibrate(model_dir: str, m: int, k: int = 256, tokens: int = 4096, iters: int = 20, seed: int = 0,
              grouping: str = "contiguous", positions: int | None = None, copies: int = 2) -> tuple[dict, dict]:
    """``positions``: move each calibration key to ``copies`` random positions below this
    (default: the model's context length; 0 = keys only where the text puts them)."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvcompress.offline.capture import capture_qkv
    from vllm_kvcompress.offline.pq import fit_codebooks, subspace_dims
    from vllm_kvcompress.offline.prompts import stdlib_text

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(stdlib_text(), add_special_tokens=False)["input_ids"][:tokens]
    if positions is None:
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    theta = check_default_rope(config) if positions else 0.0
    captured = capture_qkv(model_dir, ids)
    spread = torch.Generator().manual_seed(seed)
    head_dim = int(model_signature(config)["head_dim"])
    dims = None if grouping == "contiguous" else subspace_dims(head_dim, m, grouping)
    tensors = {} if dims is None else {"subspace_dims": dims.contiguous()}
    for layer, qkv in tqdm(captured.items(), desc="k-means per layer", unit="layer", file=sys.stderr):
        keys = spread_positions(qkv["k"], theta, positions, copies, spread) if positions else qkv["k"]
        tensors[f"layer.{layer}"] = fit_codebooks(keys, m=m, k=k, iters=iters, seed=seed + layer, dims=dims).contiguous()
    metadata = {"format": FORMAT, "m": str(m), "K": str(k), "tokens": str(len(ids)), "seed": str(seed),
                "iters": str(iters), "grouping": grouping, "positions": str(positions),
                "copies": str(copies if positions else 1), "model": Path(model_dir).name, **model_signature(config)}
    return tensors, metadata


def ensure_codebooks(model: str, m: int = 16, **options) -> Path:
    """Codebooks of a known model (``vllm_kvcompress.offline.models``) in the cache folder, made
    once with the default settings (deterministic), e.g. for `make demo` and tests."""
    from safetensors.torch import save_file

    from vllm_kvcompress.offline.models import cache_root, ensure_model

    suffix = "".join(f"-{key}{value}" for key, value in sorted(options.items()))
    out = cache_root() / "codebooks" / FORMAT.rsplit("/", 1)[-1] / f"{model}-m{m}{suffix}.safetensors"
    if not out.exists():
        tensors, metadata = calibrate(str(ensure_model(model)), m, **options)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from vllm_kvcompress.offline.models import MODELS, ensure_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"a model folder or one of {sorted(MODELS)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--m", type=int, default=32, help="subspaces per key (one uint8 code each)")
    parser.add_argument("--k", type=int, default=256, help="centroids per subspace (<= 256)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions", type=int, default=None,
                        help="move calibration keys to random positions below this (default: the model's context "
                             "length, so codebooks see every RoPE angle; 0 = off)")
    parser.add_argument("--copies", type=int, default=2, help="random positions per calibration key")
    parser.add_argument("--grouping", default="contiguous", choices=("contiguous", "rope_pairs"),
                        help="key dims per subspace: contiguous, or whole RoPE (rotate_half) pairs")
    args = parser.parse_args(argv)
    if not 2 <= args.k <= 256:
        parser.error(f"--k must be in 2..256 (codes are one byte), got {args.k}")
    model_dir = str(ensure_model(args.model)) if args.model in MODELS else args.model
    tensors, metadata = calibrate(model_dir, args.m, args.k, args.tokens, args.iters, args.seed, args.grouping,
                                  args.positions, args.copies)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {metadata['num_layers']} layers, m={args.m}, K={args.k}, {metadata['tokens']} tokens")


if __name__ == "__main__":
    main()
