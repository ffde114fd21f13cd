"""RULER tasks from ``nvidia-long-context-eval``'s own generators.

The generators are scripts (argparse at import time), so each runs in a child
interpreter with two adaptations: nltk's ``sent_tokenize`` is replaced by the regex
splitter (punkt data cannot be downloaded here), and the template carries a marker
between the task text and RULER's answer prefix so that the user turn can go through
the model's chat template and the prefix can open the assistant turn.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from vllm_kvcompress.harness.tasks import Sample
from vllm_kvcompress.offline.corpus import prefixed_chat_ids
from vllm_kvcompress.offline.corpus import ruler_data_dir

ANSWER_MARKER = "<<ANSWER_PREFIX>>"

_CHILD = r"""
import re, runpy, sys, types
from vllm_kvcompress.offline.corpus import split_sentences
nltk = types.ModuleType("nltk"); tokenize = types.ModuleType("nltk.tokenize")
tokenize.sent_tokenize = split_sentences; nltk.tokenize = tokenize
sys.modules.update({"nltk": nltk, "nltk.tokenize": tokenize})
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, __import__("os").path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def task_config(name: str) -> dict:
    """RULER's config for a task: generator name, its arguments, template, answer prefix,
    tokens to generate, and the scoring rule (string_match_all or _part)."""
    from long_context_eval.data.synthetic.constants import TASKS

    data_dir = ruler_data_dir()
    custom = yaml.safe_load((data_dir.parent.parent / "synthetic.yaml").read_text())
    if name not in custom:
        raise ValueError(f"unknown RULER task {name!r}; allowed: {sorted(custom)}")
    config = dict(custom[name])
    config.update(TASKS[config["task"]])
    config["metric"] = "part" if config["task"] == "qa" else "all"
    return config


def generate(name: str, tokenizer_path: str, max_seq_length: int, num_samples: int, seed: int = 42) -> list[dict]:
    """Raw RULER samples: {"input": user text, "answer_prefix", "outputs": [answers]}."""
    config = task_config(name)
    script = ruler_data_dir() / f"{config['task']}.py"
    template = config["template"] + ANSWER_MARKER + config.get("answer_prefix", "")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable, "-c", _CHILD, str(script),
            "--save_dir", tmp, "--save_name", name, "--tokenizer_type", "hf",
            "--tokenizer_path", tokenizer_path, "--max_seq_length", str(max_seq_length),
            "--tokens_to_generate", str(config["tokens_to_generate"]),
            "--num_samples", str(num_samples), "--random_seed", str(seed), "--template", template,
        ]
        for key, value in config["args"].items():
            args += [f"--{key}", str(value)]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"RULER generator {name} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / name / "validation.jsonl").read_text().splitlines()]
    samples = []
    for row in rows:
        # cwe prepends a solved example built from the same template: only the last
        # marker opens the answer; earlier ones just join the example's question and answer.
        user, marker, prefix = row["input"].rpartition(ANSWER_MARKER)
        if not marker:
            raise RuntimeError(f"RULER generator {name} dropped the answer-prefix marker")
        samples.append({"input": user.replace(ANSWER_MARKER, "").strip(), "answer_prefix": prefix.strip(),
                        "outputs": row["outputs"]})
    return samples


def ruler_samples(tokenizer, tokenizer_path: str, tasks: dict[str, int], length: int, seed: int = 42) -> list[Sample]:
    """``tasks`` maps a RULER task name to its number of samples at ``length``."""
    samples = []
    for name, count in tasks.items():
        config = task_config(name)
        for index, raw in enumerate(generate(name, tokenizer_path, length, count, seed)):
            ids = prefixed_chat_ids(tokenizer, raw["input"], raw["answer_prefix"])
            samples.append(Sample(f"ruler/{name}", length, index, ids, int(config["tokens_to_generate"]),
                                  [str(a) for a in raw["outputs"]], metric=config["metric"]))
    return samples
