"""Scores with RULER's own metrics (string_match_all / string_match_part), in [0, 1],
and perplexity from teacher-forced logprobs."""

from __future__ import annotations

import math
import statistics


def _ruler_metrics():
    from long_context_eval.eval.synthetic.constants import string_match_all_per_sample, string_match_part_per_sample

    return {"all": string_match_all_per_sample, "part": string_match_part_per_sample}


def score(sample: dict, result: dict) -> float:
    """RULER score of one answer (fraction of reference strings found), or the mean
    negative log-likelihood of a forced continuation (``metric == "perplexity"``)."""
    if sample["metric"] == "perplexity":
        logprobs = result["forced_logprobs"]
        return -sum(logprobs) / len(logprobs)
    metric = _ruler_metrics()[sample["metric"]]
    return metric([result["text"]], [sample["answers"]])[0] / 100.0


def cell_summary(samples: list[dict], scores: list[float]) -> dict:
    """Mean score of a cell; perplexity cells report exp(mean NLL) as well."""
    mean = statistics.fmean(scores)
    summary = {"n": len(scores), "score": mean}
    if samples[0]["metric"] == "perplexity":
        summary["perplexity"] = math.exp(mean)
    return summary
