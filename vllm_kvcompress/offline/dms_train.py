"""DMS retrofit (adapter mode): train per-layer eviction adapters on a frozen model.

    python -m vllm_kvcompress.offline.dms_train --model smollm2-135m --out DIR --steps 300 --window 256 --seq 512

Teacher and student are the same frozen transformers model: the teacher runs with the
adapters off (plain causal attention), the student with the DMS training mask. Each
decoder layer's adapter reads the residual stream entering the layer (before the input
norm) and gives logits ``z``; with logistic noise, ``alpha = sigmoid((z + g) / tau)``
(tau 0.1). Keys get their decision one position later (shift by one), and a query adds
``log(1 - alpha_j)`` to keys more than ``window`` positions back (delayed eviction).
Loss = KL(student || teacher) per token + ``max(0, (1 - 1/CR(step)) - mean(hard alpha))``,
CR rising linearly by 1 every ``--steps-per-ratio`` steps.

Writes ``adapters-step{N}.safetensors`` (adapters, metadata: format, model shape, window,
step, target ratio, achieved ratio) every ``--save-every`` steps, ``state.safetensors``
(+ ``state.json``, with the last step's per-(layer, KV head) marked fraction) to resume,
and ``training.json`` / ``training.png`` (KL and achieved vs target compression per step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vllm_kvcompress.methods.dms.decisions import (DMSAdapter, eviction_flags, neuron_logits, visible,
                                                   without_decision_channel)
from vllm_kvcompress.offline.dms_objective import (compression_loss, gumbel_sigmoid, log_keep_bias, noisy_logits,
                                                   shift_to_keys, target_ratio)
from vllm_kvcompress.methods.dms.checkpoint import FORMAT

ATTENTION = "kvcompress_dms"


class DMSRetrofit:
    """Adapters + hooks on a transformers decoder-only model (Llama/Qwen2 layout)."""

    def __init__(self, model, window: int, tau: float = 0.1, seed: int = 0, hard: bool = False,
                 query_channel: tuple[float, float] | None = None):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        from transformers.models.llama.modeling_llama import eager_attention_forward

        config = model.config
        self.model, self.window, self.tau = model, window, tau
        self.hard = hard  # inference: z > 0 evicts, no noise (the reference the engine is tested against)
        self.marked: dict[int, torch.Tensor] = {}
        self.kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // self.kv_heads
        self.adapters = torch.nn.ModuleList(
            DMSAdapter(config.hidden_size, self.kv_heads, getattr(config, "rms_norm_eps", 1e-6))
            for _ in model.model.layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.active = False
        self.bias: dict[int, torch.Tensor] = {}
        self.alphas: dict[int, torch.Tensor] = {}
        # Single-neuron inference (scale, offset): decisions from the pre-RoPE query's last
        # channel of each group's first head, which leaves q . k (zeroed before and after RoPE).
        self.query_channel = query_channel
        for index, layer in enumerate(model.model.layers):
            if query_channel is None:
                layer.register_forward_pre_hook(self._decide(index), with_kwargs=True)
            else:
                layer.self_attn.q_proj.register_forward_hook(self._decide_from_query(index))

        def attention(module, query, key, value, attention_mask, **kwargs):
            if self.active and self.query_channel is not None:
                query = query.clone()
                query[:, :: self.group, :, -1] = 0
            bias = self.bias.get(module.layer_idx) if self.active else None
            if bias is not None:
                attention_mask = bias if attention_mask is None else attention_mask + bias
            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(ATTENTION, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)  # an additive float causal mask
        model.set_attn_implementation(ATTENTION)
        for p in model.parameters():
            p.requires_grad_(False)

    def _decide(self, index: int):
        def hook(module, args, kwargs):
            if not self.active:
                return
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, hidden]
            if x.shape[0] != 1:
                raise ValueError("DMS retrofit trains on one sequence per step")
            z = self.adapters[index](x[0]).T  # [H_kv, T]
            if self.hard:
                self._hard_bias(index, z, x.dtype)
                return
            noisy = shift_to_keys(noisy_logits(z, self.tau, self.generator))
            self.alphas[index] = gumbel_sigmoid(z, noisy=noisy)
            bias = log_keep_bias(noisy, self.window).repeat_interleave(self.group, 0)  # [Hq, T, T]
            self.bias[index] = bias[None].to(x.dtype)

        return hook

    def _hard_bias(self, index: int, z: torch.Tensor, dtype: torch.dtype) -> None:
        self.marked[index] = eviction_flags(z)
        hidden = ~visible(self.marked[index], self.window)
        bias = torch.zeros(hidden.shape, dtype=dtype, device=z.device).masked_fill(hidden, float("-inf"))
        self.bias[index] = bias.repeat_interleave(self.group, 0)[None]

    def _decide_from_query(self, index: int):
        def hook(module, args, output):
            if not self.active:
                return None
            q = output[0].view(output.shape[1], self.kv_heads * self.group, -1)  # [T, Hq, D]
            self._hard_bias(index, neuron_logits(q, self.kv_heads, *self.query_channel).T, output.dtype)
            return without_decision_channel(q, self.kv_heads).view_as(output)

        return hook

    def losses(self, ids: torch.Tensor, step: int, steps_per_ratio: int, max_ratio: float):
        """(total loss, KL, achieved mean alpha per layer [L, H_kv], target ratio)."""
        self.active = False
        with torch.no_grad():
            teacher = torch.log_softmax(self.model(ids).logits.float(), dim=-1)
        self.active = True
        try:
            student = torch.log_softmax(self.model(ids).logits.float(), dim=-1)
        finally:
            self.active = False
        kl = (student.exp() * (student - teacher)).sum(-1).mean()
        # The last key's decision is never made (shift by one): leave it out of the mean.
        alphas = torch.stack([self.alphas[i][:, :-1] for i in range(len(self.adapters))])  # [L, H, T-1]
        ratio = target_ratio(step, steps_per_ratio, max_ratio)
        total = kl + compression_loss(alphas, ratio)
        return total, kl.detach(), alphas.detach().mean(-1), ratio


def save_adapters(path: Path, retrofit: DMSRetrofit, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{k}": v.detach().contiguous() for i, a in enumerate(retrofit.adapters)
               for k, v in a.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, **{k: str(v) for k, v in meta.items()}})


def _texts(tokenizer, seq: int, count: int, seed: int) -> list[list[int]]:
    import random

    from vllm_kvcompress.offline.corpus import essay_sentences, take_tokens

    sentences, rng = essay_sentences(), random.Random(seed)
    out = []
    while len(out) < count:
        text = " ".join(take_tokens(tokenizer, sentences, seq, start=rng.randrange(len(sentences))))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq]
        if len(ids) == seq:
            out.append(ids)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--steps-per-ratio", type=int, default=100)
    parser.add_argument("--max-ratio", type=float, default=8.0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="torch device for model and adapters (e.g. cuda)")
    parser.add_argument("--texts", default=None,
                        help="JSON list of token-id lists to train on (default: Paul Graham essays, tokenised here)")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from vllm_kvcompress.offline.models import load_eager

    tokenizer, model = load_eager(args.model, args.threads)
    model.to(args.device)
    retrofit = DMSRetrofit(model, args.window)
    retrofit.adapters.to(args.device)
    params = list(retrofit.adapters.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, start = [], 0
    if (out / "state.json").is_file():  # resume: adapters, optimizer moments, step, log
        state = json.loads((out / "state.json").read_text())
        tensors = load_file(str(out / "state.safetensors"))
        retrofit.adapters.load_state_dict({k[len("adapters."):]: v for k, v in tensors.items() if k.startswith("adapters.")})
        optimizer.load_state_dict({"state": {int(i): {"step": torch.tensor(float(state["step"])),
                                                      "exp_avg": tensors[f"opt.{i}.exp_avg"],
                                                      "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}
                                             for i in range(len(params))},
                                   "param_groups": optimizer.state_dict()["param_groups"]})
        start, log = state["step"], state["log"]
    if args.texts:
        texts = [ids[:args.seq] for ids in json.loads(Path(args.texts).read_text())]
    else:
        texts = _texts(tokenizer, args.seq, args.steps, seed=0)
    bar = tqdm(range(start, args.steps), desc="DMS retrofit", unit="step", initial=start, total=args.steps)
    for step in bar:
        ids = torch.tensor([texts[step % len(texts)]], device=args.device)
        total, kl, per_head, ratio = retrofit.losses(ids, step, args.steps_per_ratio, args.max_ratio)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        achieved = 1.0 / max(1.0 - float(per_head.mean()), 1e-6)
        log.append({"step": step + 1, "kl": float(kl), "target_ratio": ratio, "achieved_ratio": achieved})
        bar.set_postfix(kl=f"{float(kl):.4f}", cr=f"{achieved:.2f}/{ratio:.2f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            meta = {"num_layers": len(retrofit.adapters), "hidden_size": model.config.hidden_size,
                    "num_kv_heads": retrofit.kv_heads, "window": args.window, "step": step + 1,
                    "target_ratio": ratio, "achieved_ratio": achieved, "model": args.model}
            save_adapters(out / f"adapters-step{step + 1}.safetensors", retrofit, meta)
            opt = optimizer.state_dict()["state"]
            save_file({**{f"adapters.{k}": v.contiguous() for k, v in retrofit.adapters.state_dict().items()},
                       **{f"opt.{i}.{name}": s[name].contiguous() for i, s in opt.items()
                          for name in ("exp_avg", "exp_avg_sq")}}, str(out / "state.safetensors"))
            (out / "state.json").write_text(json.dumps({"step": step + 1, "log": log,
                                                        "per_layer_alpha": per_head.tolist()}))
    (out / "training.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    plot(log, out / "training.png", args.model)


def plot(log: list[dict], path: Path, model: str) -> None:
    """Teacher KL and achieved vs target compression along the schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [r["kl"] for r in log])
    left.set(xlabel="step", ylabel="KL(student || teacher) per token", yscale="log")
    right.plot(steps, [r["target_ratio"] for r in log], label="target")
    right.plot(steps, [r["achieved_ratio"] for r in log], label="achieved (hard decisions)")
    right.set(xlabel="step", ylabel="compression ratio")
    right.legend()
    fig.suptitle(f"DMS retrofit, {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
