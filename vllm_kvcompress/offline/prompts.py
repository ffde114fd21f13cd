"""Deterministic prompts for demos and tests, built offline.

Long documents come from the docstrings of Python's standard library (real English
prose, identical wherever the same Python runs), so no data set has to be fetched.
"""

from __future__ import annotations

import importlib
import inspect

DOC_MODULES = (
    "statistics", "argparse", "json", "http.client", "urllib.request", "unittest", "heapq",
    "itertools", "subprocess", "typing", "difflib", "collections", "string", "logging",
    "csv", "shutil", "tarfile", "zipfile", "sqlite3", "calendar", "datetime", "random",
)

SHORT_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 multiplied by 23?",
)


def stdlib_text() -> str:
    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def chat_text(tokenizer, user_text: str) -> str:
    """The chat template with the generation prompt, as text."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                         tokenize=False)


def chat_ids(tokenizer, user_text: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def long_document_ids(tokenizer, num_tokens: int, offset: int = 0, question: str = "Summarise the text above in one sentence.") -> list[int]:
    """A chat prompt of at least ``num_tokens`` tokens (a few more at most): a slice of
    the stdlib text, then a question."""
    frame = chat_ids(tokenizer, "\n\n" + question)
    body = tokenizer(stdlib_text(), add_special_tokens=False)["input_ids"]
    need = num_tokens - len(frame)
    # Re-tokenising a decoded slice can merge tokens at the seams: grow until long enough.
    while 0 < need and offset + need <= len(body):
        ids = chat_ids(tokenizer, tokenizer.decode(body[offset : offset + need]) + "\n\n" + question)
        if len(ids) >= num_tokens:
            return ids
        need += max(1, num_tokens - len(ids))
    raise ValueError(f"cannot build a {num_tokens}-token prompt at offset {offset} (text has {len(body)} tokens)")


def mixed_prompts(tokenizer, long_lengths: tuple[int, ...] = (2100, 2600)) -> list[list[int]]:
    """Short questions and long documents, in an interleaved order so batches mix lengths."""
    prompts = [chat_ids(tokenizer, q) for q in SHORT_QUESTIONS]
    for i, n in enumerate(long_lengths):
        prompts.insert(2 * i + 1, long_document_ids(tokenizer, n, offset=1500 * i))
    return prompts
