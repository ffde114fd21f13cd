"""Head-importance scores for HeadKV, the paper's R2 recipe (retrieval + reasoning).

    python -m vllm_kvcompress.offline.head_scores --model qwen2.5-coder-0.5b --out scores.json [--plot scores.png]

Each example hides a contrastive needle in Paul Graham essays: two people, their
favourite things and their ages, then asks for the favourite thing of the older (or
younger) one, so the model has to retrieve *and* reason. While the model answers, every
(layer, query head) gets, per decode step, the attention weight its last query puts on
the top-N positions (N = answer-span length) that fall inside the correct answer span,
divided by N (the R2 score), summed over the answer's steps. Importance is the mean
over the examples the model answers correctly (the paper's filter), normalised over all
heads. ``--answers forced`` teacher-forces the correct answer instead and keeps every
example: for models that fail the task (SmolLM2-135M does), a documented deviation.

Runs transformers on the CPU with eager attention; only one attention row per layer and
step is ever kept (the prompt is prefilled without attention outputs).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

NAMES = ("Mary", "John", "Alice", "Peter", "Sarah", "David", "Emma", "Lucas", "Olivia", "Henry", "Clara", "Oscar")


def _things() -> list[str]:
    from vllm_kvcompress.offline.corpus import needle_keys

    adjectives, nouns = needle_keys()
    rng = random.Random(0)
    return [f"{rng.choice(adjectives)} {rng.choice(nouns)}" for _ in range(400)]


def build_example(tokenizer, sentences, length: int, depth: int, older: bool, seed: int) -> dict | None:
    from vllm_kvcompress.offline.corpus import needle_prompt

    rng = random.Random(f"r2-{seed}-{length}-{depth}-{older}")
    a, b = rng.sample(NAMES, 2)
    thing_a, thing_b = rng.sample(_things(), 2)
    age_a, age_b = rng.sample(range(12, 80), 2)
    needle = (f"{a}'s favourite thing is {thing_a}. {b}'s favourite thing is {thing_b}. "
              f"{a} is {age_a} years old. {b} is {age_b} years old.")
    which = "older" if older else "younger"
    answer = thing_a if (age_a > age_b) == older else thing_b
    ids = needle_prompt(tokenizer, head="Read the text below and answer the question about the people in it.",
                        tail=f"What is the favourite thing of the {which} one? Answer with the thing only.",
                        answer_prefix=f"The favourite thing of the {which} one is", needle=needle,
                        sentences=sentences, start=rng.randrange(len(sentences)), depth=depth, budget=length)
    span_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(span_ids) + 1):
        if ids[start:start + len(span_ids)] == span_ids:
            return {"ids": ids, "span": (start, start + len(span_ids)), "answer": answer, "answer_ids": span_ids,
                    "length": length, "depth": depth, "which": which}
    return None  # the answer tokenises differently in context: skip the example


@torch.no_grad()
def score_example(model, tokenizer, example: dict, forced: bool, max_new: int = 16) -> tuple[torch.Tensor, bool, str]:
    """``([layers, query heads] R2 score, answered correctly, generated text)``."""
    ids = example["ids"]
    start, end = example["span"]
    n = end - start
    out = model(torch.tensor([ids[:-1]]), use_cache=True)
    cache, token = out.past_key_values, ids[-1]
    targets = example["answer_ids"] if forced else None
    steps = len(targets) if forced else max_new
    total, generated = None, []
    for step in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, output_attentions=True)
        cache = out.past_key_values
        rows = torch.stack([a[0, :, -1].float() for a in out.attentions])  # [L, Hq, T]
        top = rows.topk(n, dim=-1)
        inside = (top.indices >= start) & (top.indices < end)
        step_score = (top.values * inside).sum(-1) / n
        total = step_score if total is None else total + step_score
        token = targets[step] if forced else int(out.logits[0, -1].argmax())
        generated.append(token)
        if not forced and token == tokenizer.eos_token_id:
            break
    text = tokenizer.decode(generated)
    return total, forced or example["answer"].lower() in text.lower(), text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a name from vllm_kvcompress.offline.models or a model folder")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--lengths", default="1000,2000,3000", help="prompt lengths in tokens (comma-separated)")
    parser.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    parser.add_argument("--answers", choices=("generated", "forced"), default="generated",
                        help="generated: the paper's filter (correct answers only); forced: teacher-force the answer")
    parser.add_argument("--plot", help="also draw a layer x head heat map (PNG)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from vllm_kvcompress.methods.headkv import HeadScores
    from vllm_kvcompress.offline.corpus import essay_sentences
    from vllm_kvcompress.offline.models import load_eager

    tokenizer, model = load_eager(args.model, args.threads)
    config = model.config
    sentences = essay_sentences()
    plan = [(int(l), int(d), older) for l in args.lengths.split(",") for d in args.depths.split(",")
            for older in (True, False)]
    kept, per_example, answers = [], [], []
    for length, depth, older in tqdm(plan, desc="R2 head scores", unit="example"):
        example = build_example(tokenizer, sentences, length, depth, older, seed=0)
        if example is None:
            continue
        score, correct, text = score_example(model, tokenizer, example, args.answers == "forced")
        answers.append({"length": length, "depth": depth, "which": example["which"], "answer": example["answer"],
                        "generated": text, "correct": correct})
        if correct:
            per_example.append(score)
        kept.append(correct)
    if not per_example:
        raise SystemExit(f"no example answered correctly ({len(kept)} tried): rerun with --answers forced")
    mean = torch.stack(per_example).mean(0).clamp_min(1e-12)  # a head that never scores stays (barely) positive
    mean = (mean / mean.sum()).tolist()
    scores = HeadScores(tuple(tuple(row) for row in mean), config.num_key_value_heads)
    meta = {"model": args.model, "recipe": "R2 (HeadKV): answer-span attention of the top-N positions",
            "answers": args.answers, "examples_used": len(per_example), "examples_tried": len(kept),
            "lengths": args.lengths, "depths": args.depths, "gqa_rule": "KV head = mean of its query heads",
            "examples": answers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(scores.to_json(**meta), indent=1))
    print(f"{len(per_example)}/{len(kept)} examples used; wrote {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6))
        image = ax.imshow(torch.tensor(mean), aspect="auto", cmap="viridis")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"R2 head importance, {args.model} ({len(per_example)} examples, {args.answers})")
        fig.colorbar(image)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
