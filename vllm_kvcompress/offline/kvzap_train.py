"""Train KVzap predictors for a model: KVzip+ oracle targets on local text, then
KVzap-Linear (closed-form ridge) and KVzap-MLP per layer, scored on held-out text.

    python -m vllm_kvcompress.offline.kvzap_train --model smollm2-135m --out DIR [--texts 24 --held-out 4]

Text: Paul Graham essays (RULER's data), ~``--tokens`` tokens per text, in the paper's
repeat prompt (user: text + "Repeat the previous context exactly."; assistant: text).
Transformers on the CPU with eager attention; forward hooks take each layer's attention
input (after the input norm) and values. Writes ``kvzap-linear.safetensors``,
``kvzap-mlp.safetensors`` (per-layer weights; metadata: format, model shape, kind) and
``quality.json`` / ``quality.png`` (per-layer R² and Pearson on the held-out texts).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from vllm_kvcompress.methods.kvzap.predictors import FORMAT
from vllm_kvcompress.offline.kvzap_fit import fit_mlp, fit_ridge, head_output_norms, kvzip_plus_targets, quality

REPEAT = "\n\nRepeat the previous context exactly."


def repeat_prompt(tokenizer, text: str) -> tuple[list[int], int, int, int]:
    """``(ids, original start, repeat start, length)``: the chat template around the
    text, tokenised piecewise so that both copies are exactly the text's own tokens
    (tokenising the whole prompt can merge tokens at the seams, e.g. with Qwen's BPE)."""
    from vllm_kvcompress.offline.prompts import chat_text

    marker = "\x00TEXT\x00"
    before, after = chat_text(tokenizer, marker + REPEAT).split(marker)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, text_ids, suffix = encode(before), encode(text), encode(after)
    ids = prefix + text_ids + suffix
    return ids + text_ids, len(prefix), len(ids), len(text_ids)


@torch.no_grad()
def layer_samples(model, ids: list[int], orig: int, rep: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (attention inputs of the original tokens ``[n, hidden]``, oracle ``[n, Hkv]``)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inputs, values = {}, {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hooks.append(attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=index: inputs.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None))[0]),
            with_kwargs=True))
        hooks.append(attn.v_proj.register_forward_hook(lambda mod, a, out, i=index: values.__setitem__(i, out[0])))
    try:
        out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    samples = []
    for index, layer in enumerate(model.model.layers):
        attention = out.attentions[index][0, :, rep:rep + n, orig:orig + n]  # [Hq, R, T]
        v = values[index].view(-1, kv_heads, head_dim).transpose(0, 1)[:, orig:orig + n]  # [Hkv, T, D]
        norms = head_output_norms(v, layer.self_attn.o_proj.weight, heads // kv_heads)
        hidden = inputs[index].float()
        target = kvzip_plus_targets(attention, norms, torch.linalg.vector_norm(hidden[rep:rep + n], dim=-1),
                                    heads // kv_heads)
        samples.append((hidden[orig:orig + n], target.T))
    return samples


def save_predictors(path: Path, predictors: list[torch.nn.Module], kind: str, model_name: str, config) -> None:
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{name}": p.detach().contiguous() for i, m in enumerate(predictors)
               for name, p in m.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "kind": kind, "model": model_name,
                                            "num_layers": str(config.num_hidden_layers),
                                            "hidden_size": str(config.hidden_size),
                                            "num_kv_heads": str(config.num_key_value_heads)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--texts", type=int, default=24, help="training texts")
    parser.add_argument("--held-out", type=int, default=4, help="held-out texts for R²/Pearson")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per text (the prompt holds it twice)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from vllm_kvcompress.offline.corpus import essay_sentences, take_tokens
    from vllm_kvcompress.offline.models import load_eager

    tokenizer, model = load_eager(args.model, args.threads)
    sentences = essay_sentences()
    rng = random.Random(0)
    per_layer_train: list[list] = [[] for _ in model.model.layers]
    per_layer_test: list[list] = [[] for _ in model.model.layers]
    used = 0
    with tqdm(total=args.texts + args.held_out, desc="KVzip+ oracle", unit="text") as bar:
        while used < args.texts + args.held_out:
            text = " ".join(take_tokens(tokenizer, sentences, args.tokens, start=rng.randrange(len(sentences))))
            prompt = repeat_prompt(tokenizer, text)
            target = per_layer_train if used < args.texts else per_layer_test
            for layer, sample in enumerate(layer_samples(model, *prompt)):
                target[layer].append(sample)
            used += 1
            bar.update()
    report, linear, mlp = {"model": args.model, "texts": args.texts, "held_out": args.held_out,
                           "tokens_per_text": args.tokens, "layers": []}, [], []
    for layer in tqdm(range(len(per_layer_train)), desc="fit predictors", unit="layer"):
        x = torch.cat([h for h, _ in per_layer_train[layer]])
        y = torch.cat([t for _, t in per_layer_train[layer]])
        xt = torch.cat([h for h, _ in per_layer_test[layer]])
        yt = torch.cat([t for _, t in per_layer_test[layer]])
        linear.append(fit_ridge(x, y))
        mlp.append(fit_mlp(x, y))
        with torch.no_grad():
            report["layers"].append({"layer": layer, "linear": quality(linear[-1](xt), yt),
                                     "mlp": quality(mlp[-1](xt), yt)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_predictors(out / "kvzap-linear.safetensors", linear, "linear", args.model, model.config)
    save_predictors(out / "kvzap-mlp.safetensors", mlp, "mlp", args.model, model.config)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("linear", "mlp"):
        ax.plot([r[kind]["r2"] for r in report["layers"]], marker="o", label=f"KVzap-{kind} R²")
        ax.plot([r[kind]["pearson"] for r in report["layers"]], linestyle="--", label=f"KVzap-{kind} Pearson")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out quality")
    ax.set_title(f"KVzap predictors vs KVzip+ oracle, {args.model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    for r in report["layers"]:
        print(f"layer {r['layer']:2d}: linear R² {r['linear']['r2']:.3f} r {r['linear']['pearson']:.3f} | "
              f"mlp R² {r['mlp']['r2']:.3f} r {r['mlp']['pearson']:.3f}")


if __name__ == "__main__":
    main()
