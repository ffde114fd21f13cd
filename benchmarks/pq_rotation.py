"""Does rotating keys before product quantization help LOOKAT? Fidelity of PQ keys with and
without an orthogonal rotation, on every layer of a model (issue 24, item 2).

    python -m benchmarks.pq_rotation --model qwen2.5-coder-0.5b --ms 16,32 --lengths 2048,8192 \\
        --out results/2026-12-03/pq-rotation/qwen2.5-coder-0.5b

Rotations ``R`` (orthogonal, per layer and KV head; keys ``k @ R``, queries alike, so
``q . k`` is unchanged and only the quantization error differs):

* ``none``: PQ on the cache's keys as today (contiguous subspaces);
* ``hadamard``: a randomized Hadamard transform (random signs, seed = layer), which spreads
  outlier channels over all dims (QuaRot's trick for scalar quantization);
* ``pca``: the calibration keys' principal axes, assigned to the ``m`` subspaces so that the
  products of their variances balance (parametric OPQ's eigenvalue allocation).

Codebooks and rotations are fitted as :mod:`vllm_kvcompress.offline.calibrate` fits them
(Python stdlib docstrings, keys moved to random positions below the model's context unless
``--calib plain``); scored on other text (RULER's Paul Graham essays) with the metrics of
:mod:`benchmarks.fidelity_sweep` (values exact, keys only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.fidelity_sweep import (Reference, capture, evaluation_ids, load_model, pq_keys, query_positions,
                                       summarize)

ROTATIONS = ("none", "hadamard", "pca")


def hadamard_rotation(head_dim: int, seed: int) -> torch.Tensor:
    """``[D, D]`` orthogonal: random signs times the normalised Sylvester Hadamard matrix."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return signs[:, None] * h / math.sqrt(head_dim)


def pca_rotation(keys: torch.Tensor, m: int) -> torch.Tensor:
    """``[Hkv, D, D]``: per KV head, the principal axes of ``keys [Hkv, T, D]``, grouped into
    ``m`` subspaces of ``D / m`` axes, each axis (largest variance first) going to the open
    subspace whose log-variance sum is smallest."""
    rotations = []
    for head in keys.float():
        centred = head - head.mean(0)
        variances, axes = torch.linalg.eigh(centred.T @ centred / centred.shape[0])
        size = head.shape[1] // m
        members: list[list[int]] = [[] for _ in range(m)]
        load = [0.0] * m
        for axis in torch.argsort(variances, descending=True).tolist():
            target = min((s for s in range(m) if len(members[s]) < size), key=load.__getitem__)
            members[target].append(axis)
            load[target] += math.log(max(float(variances[axis]), 1e-12))
        rotations.append(axes[:, [a for group in members for a in group]])
    return torch.stack(rotations)


def rotation_for(name: str, calibration: torch.Tensor, m: int, layer: int) -> torch.Tensor | None:
    heads, _, head_dim = calibration.shape
    if name == "none":
        return None
    if name == "hadamard":
        return hadamard_rotation(head_dim, layer).expand(heads, head_dim, head_dim)
    return pca_rotation(calibration, m)


def rotated(x: torch.Tensor, rotation: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    if rotation is None:
        return x.float()
    return torch.einsum("hte,hde->htd" if inverse else "htd,hde->hte", x.float(), rotation)


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvcompress.offline.models import MODELS, ensure_model
    from vllm_kvcompress.offline.pq import fit_codebooks
    from vllm_kvcompress.offline.prompts import stdlib_text
    from vllm_kvcompress.offline.rope import check_default_rope, spread_positions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"one of {sorted(MODELS)} or a model folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ms", default="16,32")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--rotations", default=",".join(ROTATIONS))
    parser.add_argument("--calib", choices=("rope-aug", "plain"), default="rope-aug")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--layers", default=None, help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    rotations = args.rotations.split(",")
    unknown = [r for r in rotations if r not in ROTATIONS]
    if unknown:
        parser.error(f"--rotations: unknown {unknown}; allowed: {', '.join(ROTATIONS)}")
    started = time.time()
    model_dir = str(ensure_model(args.model)) if args.model in MODELS else args.model
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ms = [int(x) for x in args.ms.split(",")]
    lengths = sorted(int(x) for x in args.lengths.split(","))
    model = load_model(model_dir)
    calib_ids = tokenizer(stdlib_text(), add_special_tokens=False)["input_ids"][: args.calib_tokens]
    calibration = {i: e["k"] for i, e in capture(model, calib_ids, None).items()}
    theta = check_default_rope(config) if args.calib == "rope-aug" else 0.0
    positions, where = query_positions(lengths, 64)
    captured = capture(model, evaluation_ids(tokenizer, lengths[-1]), positions)
    del model
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(captured)
    names = [f"pq-m{m}-{r}" for m in ms for r in rotations]
    per_layer: dict[str, dict[str, list]] = {n: {str(length): [] for length in lengths} for n in names}
    bar = tqdm(total=len(layers) * len(names), desc="layer x format", unit="fmt", file=sys.stderr)
    for layer in layers:
        entry = captured[layer]
        refs = {n: Reference(entry["q"][:, where[n]], entry["k"][:, :n], entry["v"][:, :n], entry["scale"], 32)
                for n in lengths}
        calib = calibration[layer]
        if theta:
            calib = spread_positions(calib, theta, int(config.max_position_embeddings), 2,
                                     torch.Generator().manual_seed(layer))
        for m in ms:
            for rotation_name in rotations:
                rotation = rotation_for(rotation_name, calib.float(), m, layer)
                codebooks = fit_codebooks(rotated(calib, rotation), m=m, iters=args.iters, seed=layer)
                keys = rotated(pq_keys(rotated(entry["k"], rotation), codebooks), rotation, inverse=True)
                for n in lengths:
                    per_layer[f"pq-m{m}-{rotation_name}"][str(n)].append({"layer": layer, **refs[n].compare(keys[:, :n])})
                bar.update()
    bar.close()
    result = {"model": args.model, "layers": layers, "lengths": lengths, "calibration": args.calib,
              "results": {n: {length: summarize(rows) for length, rows in by.items()} for n, by in per_layer.items()},
              "command": "python -m benchmarks.pq_rotation " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d"), "total_s": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# PQ keys with and without a rotation: {args.model}", "",
             f"`{result['command']}` ({result['date']}, {len(layers)} layers, calibration {args.calib}).", "",
             "Mean over layers (worst layer in brackets); values exact, keys only.", "",
             "| format | " + " | ".join(f"cosine @{n} | KL @{n} | top-32 @{n}" for n in lengths) + " |",
             "|---|" + "---|---|---|" * len(lengths)]
    for name in names:
        cells = []
        for n in lengths:
            s = result["results"][name][str(n)]
            cells += [f"{s['mean']['output_cosine']:.4f} ({s['worst_layer']['output_cosine']:.4f})",
                      f"{s['mean']['attention_kl']:.3f}", f"{s['mean']['topk_overlap']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
