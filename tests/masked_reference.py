"""Shared by the stream tests: attention of one query over a masked prefix, per layer."""

import torch


def masked_attention(q, k, v, pos, mask):
    """``q[L, T, Hq, D]``, ``k/v[L, T, H, D]``: the query at ``pos`` over positions
    ``0..pos`` where ``mask[L, H, pos + 1]`` -> ``[L, Hq, D]``."""
    layers, _, q_heads, dim = q.shape
    heads = k.shape[2]
    outs = []
    for layer in range(layers):
        kk, vv = k[layer, : pos + 1].transpose(0, 1), v[layer, : pos + 1].transpose(0, 1)
        logits = (q[layer, pos].view(heads, q_heads // heads, dim) @ kk.transpose(1, 2)) * dim ** -0.5
        logits = logits.masked_fill(~mask[layer][:, None, :], float("-inf"))
        outs.append((torch.softmax(logits, -1) @ vv).reshape(q_heads, dim))
    return torch.stack(outs)
