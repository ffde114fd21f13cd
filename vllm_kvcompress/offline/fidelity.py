"""Attention-fidelity metrics: how close a compressed attention is to the exact one.

Plain tensors in, floats out, reduced over every leading dimension (tokens, heads,
layers). Used by the LOOKAT work (PQ scores vs exact scores) and for eviction
diagnostics, on real Q/K/V captured from the model.
"""

from __future__ import annotations

import torch


def output_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of attention outputs along the last dim: mean and worst row."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def attention_kl(reference_scores: torch.Tensor, candidate_scores: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """KL(P_ref || P_cand) of the softmax distributions of two score tensors (pre-softmax
    logits over the last dim). ``mask`` (True = attend) applies to both; masked
    positions carry no probability."""
    ref, cand = reference_scores.double(), candidate_scores.double()
    if mask is not None:
        ref = ref.masked_fill(~mask, float("-inf"))
        cand = cand.masked_fill(~mask, float("-inf"))
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    terms = torch.where(log_p.isfinite(), log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    kl = terms.sum(-1)
    return {"mean": float(kl.mean()), "max": float(kl.max())}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, ties given their average rank (as scipy's rankdata)."""
    x = x.double()
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    n = x.shape[-1]
    positions = torch.arange(n, dtype=torch.float64).expand_as(x)
    # Average the positions inside each run of equal values.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    run_id = new_run.long().cumsum(-1) - 1
    run_sum = torch.zeros_like(sorted_x).scatter_add_(-1, run_id, positions)
    run_len = torch.zeros_like(sorted_x).scatter_add_(-1, run_id, torch.ones_like(positions))
    avg = (run_sum / run_len.clamp(min=1)).gather(-1, run_id)
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Spearman rank correlation along the last dim (e.g. attention logits over keys)."""
    ra, rb = _ranks(reference), _ranks(candidate)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    rho = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))
    return {"mean": float(rho.mean()), "min": float(rho.min())}


def topk_overlap(reference: torch.Tensor, candidate: torch.Tensor, k: int) -> dict[str, float]:
    """Fraction of the reference's top-k positions (last dim) that the candidate also ranks top-k."""
    if not 0 < k <= reference.shape[-1]:
        raise ValueError(f"k must be in 1..{reference.shape[-1]}, got {k}")
    top_ref = reference.topk(k, dim=-1).indices
    top_cand = candidate.topk(k, dim=-1).indices
    hits = (top_ref.unsqueeze(-1) == top_cand.unsqueeze(-2)).any(-1).double().sum(-1) / k
    return {"mean": float(hits.mean()), "min": float(hits.min())}
