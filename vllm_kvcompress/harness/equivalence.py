"""Compare greedy generations of two backends token by token.

A bf16 model rounds its logits to bf16 (one ulp is 0.125 at magnitudes 16-32), so two
correct attention implementations that round differently can pick different tokens
where the top two logits are within a few ulps; vLLM's own CPU backend does this
against itself between two runs with identical settings, because batch composition
depends on request arrival. A divergence is accepted only at such a tie: at the first
differing step each run prefers its own token, and the gap between the two tokens
moved by at most ``NEAR_TIE_NATS`` in total. A wrong attention kernel moves it by nats;
exact equality is checked separately in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

# Four bf16 ulps at logit magnitude 16-32.
NEAR_TIE_NATS = 0.5


@dataclass
class Divergence:
    prompt: int
    step: int
    reference_token: int
    candidate_token: int
    reference_margin: float | None  # logprob(ref token) - logprob(candidate token), in the reference run
    candidate_margin: float | None  # logprob(candidate token) - logprob(ref token), in the candidate run

    @property
    def gap_shift(self) -> float | None:
        """How far the logit gap between the two tokens moved from one run to the other."""
        if self.reference_margin is None or self.candidate_margin is None:
            return None
        return self.reference_margin + self.candidate_margin

    @property
    def is_near_tie(self) -> bool:
        margins = (self.reference_margin, self.candidate_margin)
        return all(m is not None and m >= 0 for m in margins) and self.gap_shift <= NEAR_TIE_NATS

    def explain(self) -> str:
        kind = "near-tie (rounding)" if self.is_near_tie else "NOT a near-tie"
        return (
            f"prompt {self.prompt} step {self.step}: reference token {self.reference_token}, candidate "
            f"{self.candidate_token}; margins {self.reference_margin} / {self.candidate_margin} nats "
            f"(gap moved {self.gap_shift}) -> {kind}"
        )


def _logprob(top: list, token: int) -> float | None:
    return next((lp for tok, lp in top if tok == token), None)


def first_divergences(reference: list[dict], candidate: list[dict]) -> list[Divergence]:
    found = []
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        pairs = zip(ref["token_ids"], cand["token_ids"])
        step = next((j for j, (a, b) in enumerate(pairs) if a != b), None)
        if step is None:
            if len(ref["token_ids"]) != len(cand["token_ids"]):
                step = min(len(ref["token_ids"]), len(cand["token_ids"]))
                found.append(Divergence(i, step, -1, -1, None, None))
            continue
        a, b = ref["token_ids"][step], cand["token_ids"][step]
        ref_top, cand_top = ref["top_logprobs"][step], cand["top_logprobs"][step]
        ra, rb = _logprob(ref_top, a), _logprob(ref_top, b)
        ca, cb = _logprob(cand_top, a), _logprob(cand_top, b)
        found.append(Divergence(
            i, step, a, b,
            None if ra is None or rb is None else ra - rb,
            None if ca is None or cb is None else cb - ca,
        ))
    return found
