"""Teacher forcing through vLLM's sampler, for perplexity after a (compressed) context.

A request whose ``SamplingParams.extra_args`` carries ``FORCED_IDS_KEY`` emits exactly
those tokens, one decode step each: every other logit is set to -inf. vLLM computes
returned logprobs from the raw logits, before logits processors (``logprobs_mode``
"raw_logprobs", the default), so the logprob reported for each forced token is the
model's own — measured at decode time, over whatever cache the backend kept.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCED_IDS_KEY = "kvc_forced_ids"  # not "kvcompress_*": those are per-request settings


class ForcedContinuation(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(FORCED_IDS_KEY)
        if not forced:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            target = forced[min(len(output_ids), len(forced) - 1)]
            logits.fill_(float("-inf"))
            logits[target] = 0.0
            return logits

        return force
