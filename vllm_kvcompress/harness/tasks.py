"""Accuracy samples: passkey and needle-in-a-haystack at chosen depths, perplexity of a
teacher-forced continuation, and (in :mod:`.ruler`) RULER tasks.

A cell is (task, length). ``length`` bounds prompt + generated tokens, as RULER's
``max_seq_length`` does. Prompts use the model's own chat template; the answer prefix
is the start of the assistant turn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from vllm_kvcompress.offline.corpus import essay_sentences, needle_keys, needle_prompt, take_tokens


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt_ids: list[int]
    max_tokens: int
    answers: list[str] = field(default_factory=list)
    metric: str = "all"  # "all" / "part": RULER's string match; "perplexity": forced_ids
    depth: int | None = None
    forced_ids: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def passkey_samples(tokenizer, lengths: dict[int, list[int]], seed: int = 0) -> list[Sample]:
    """Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated filler text."""
    samples = []
    for length, depths in lengths.items():
        for index, depth in enumerate(depths):
            rng = random.Random(f"passkey-{seed}-{length}-{depth}")
            key = str(rng.randint(10000, 99999))
            ids = needle_prompt(
                tokenizer,
                head="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                     "I will quiz you about the important information there.",
                tail="What is the pass key?", answer_prefix="The pass key is",
                needle=f"The pass key is {key}. Remember it. {key} is the pass key.",
                sentences=PASSKEY_FILLER, start=rng.randrange(len(PASSKEY_FILLER)), depth=depth,
                budget=length - 16,
            )
            samples.append(Sample("passkey", length, index, ids, 16, [key], depth=depth))
    return samples


def niah_samples(tokenizer, lengths: dict[int, list[int]], seed: int = 0) -> list[Sample]:
    """RULER's single needle (word key, 7-digit value) in Paul Graham essays, at fixed depths."""
    adjectives, nouns = needle_keys()
    sentences = essay_sentences()
    samples = []
    for length, depths in lengths.items():
        for index, depth in enumerate(depths):
            rng = random.Random(f"niah-{seed}-{length}-{depth}")
            key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
            value = str(rng.randint(10**6, 10**7 - 1))
            ids = needle_prompt(
                tokenizer,
                head="A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards.",
                tail=f"What is the special magic number for {key} mentioned in the provided text?",
                answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
                needle=f"One of the special magic numbers for {key} is: {value}.",
                sentences=sentences, start=rng.randrange(len(sentences)), depth=depth,
                budget=length - 32,
            )
            samples.append(Sample("niah", length, index, ids, 32, [value], depth=depth))
    return samples


def perplexity_samples(tokenizer, lengths: dict[int, int], continuation: int = 128, seed: int = 0) -> list[Sample]:
    """Essay text: ``length`` context tokens, then ``continuation`` reference tokens that the
    engine is forced to emit one decode step at a time (scored from the raw logits)."""
    sentences = essay_sentences()
    samples = []
    for length, count in lengths.items():
        for index in range(count):
            rng = random.Random(f"ppl-{seed}-{length}-{index}")
            text = " ".join(take_tokens(tokenizer, sentences, length + continuation + 64, start=rng.randrange(len(sentences))))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < length + continuation:
                raise ValueError(f"perplexity text too short: {len(ids)} < {length + continuation}")
            samples.append(Sample("perplexity", length, index, ids[:length], continuation, metric="perplexity",
                                  forced_ids=ids[length : length + continuation]))
    return samples
