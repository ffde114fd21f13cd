"""What DMS checkpoints decide at inference: per-(layer, KV head) compression and the KL
to the unmodified model, on held-out essay texts (hard decisions, ``z > 0`` evicts,
shift by one, the checkpoint's window; transformers, fp32).

    python -m benchmarks.dms_decisions --model smollm2-135m --out DIR \\
        vllm_kvcompress/artefacts/dms/smollm2-135m/dms-cr{2,4,8}.safetensors

Per checkpoint: the decision compression ``1 / (1 - marked fraction)`` (training's
measure, window excluded) per layer and KV head, the memory compression at the text's
end (``T / (window + 1 + kept)`` rows per stream, window included) and the mean per-token
KL(DMS || full). Writes decisions.json and decisions.png (one heatmap per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.capacity import environment


def measure(model, files: list[str], texts: list[list[int]]) -> dict:
    from vllm_kvcompress.offline.dms_train import DMSRetrofit
    from vllm_kvcompress.methods.dms.checkpoint import load_decisions

    config = model.config
    shape = (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads)
    teacher = []
    with torch.no_grad():
        for ids in texts:
            teacher.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1))
    out = {}
    bar = tqdm(total=len(files) * len(texts), desc="DMS decisions", unit="text")
    for path in files:
        decisions = load_decisions(path, *shape, getattr(config, "rms_norm_eps", 1e-6))
        retrofit = DMSRetrofit(model, decisions.window, hard=True)
        retrofit.adapters = torch.nn.ModuleList(decisions.adapters)
        marked_fraction, memory, kls = [], [], []
        for ids, reference in zip(texts, teacher):
            retrofit.active = True
            try:
                with torch.no_grad():
                    student = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            finally:
                retrofit.active = False
            kls.append(float((student.exp() * (student - reference)).sum(-1).mean()))
            marked = torch.stack([retrofit.marked[i] for i in range(shape[0])])  # [L, H, T]
            length, window = marked.shape[-1], decisions.window
            marked_fraction.append(marked[..., :-1].float().mean(-1))
            kept = (~marked[..., : max(length - window - 1, 0)]).sum(-1)
            memory.append(length / (min(length, window + 1) + kept.float()))
            bar.update()
        fraction = torch.stack(marked_fraction).mean(0)
        out[Path(path).name] = {
            "window": decisions.window, "kl_per_token": statistics.fmean(kls),
            "decision_ratio": float(1 / (1 - fraction.mean())),
            "memory_ratio": float(torch.stack(memory).mean(0).reciprocal().mean().reciprocal()),
            "decision_ratio_per_head": (1 / (1 - fraction)).tolist(),
        }
    bar.close()
    return out


def plot(result: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = list(result)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = result[name]
        grid = torch.tensor(r["decision_ratio_per_head"]).clamp(1, 64)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=64))
        ax.set(title=f"{name}\nCR {r['decision_ratio']:.1f} (memory {r['memory_ratio']:.1f}x), "
                     f"KL {r['kl_per_token']:.3f}", xlabel="KV head", ylabel="layer")
        fig.colorbar(image, ax=ax, label="decision CR (log scale, capped at 64)")
    fig.suptitle(f"DMS decisions per (layer, KV head), {model}, held-out texts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from vllm_kvcompress.offline.dms_train import _texts
    from vllm_kvcompress.offline.models import load_eager

    tokenizer, model = load_eager(args.model, args.threads)
    texts = _texts(tokenizer, args.seq, args.texts, seed=12345)  # the trainer uses seed 0
    result = measure(model, args.adapters, texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**environment(), "model": args.model, "texts": args.texts, "seq": args.seq,
              "command": "python -m benchmarks.dms_decisions " + " ".join(argv or []), "checkpoints": result}
    (out / "decisions.json").write_text(json.dumps(report, indent=1))
    plot(result, out / "decisions.png", args.model)
    for name, r in result.items():
        print(f"{name}: decision CR {r['decision_ratio']:.2f}, memory CR at {args.seq} tokens "
              f"{r['memory_ratio']:.2f}x, KL {r['kl_per_token']:.4f}/token")
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
