"""Whole-row eviction's compaction of a step (``dense_layout.Evictor.run``): every layer at
once (one score, one selection and one move for a group of layers) keeps and moves in each
layer what that layer's own compaction, request by request, keeps and moves."""

from types import SimpleNamespace

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401  (fixture)
from vllm_kvcompress.eviction.selection import keep_indices
from vllm_kvcompress.kernels import compaction_ref, ops, paged_dense_ref
from vllm_kvcompress.methods.base import DenseFormat
from vllm_kvcompress.methods.knorm import KnormScorer
from vllm_kvcompress.vllm import dense_layout
from vllm_kvcompress.vllm.dense_layout import Compaction, EvictionPlan, Evictor

import_kernels("compaction_triton")

BS, D, HEADS, LAYERS = 16, 32, 2, 3
LENGTHS, TARGETS = [45, 17, 30], [20, 17, 9]  # the second request keeps everything it holds


class KeysOnly:
    """A cache format without ``key_norms``: knorm reads its keys layer by layer."""

    def __init__(self):
        self.dense = DenseFormat(D, torch.bfloat16)

    def keys_batch(self, layer, cache, block_table, length):
        return self.dense.keys_batch(layer, cache, block_table, length)


def _step(seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BS) for n in LENGTHS]
    num_blocks = sum(blocks) + 3
    caches = [torch.randn(num_blocks, HEADS, BS, 2 * D, generator=gen).bfloat16() for _ in range(LAYERS)]
    table = torch.zeros(len(LENGTHS) + 1, max(blocks) + 1, dtype=torch.int32)  # + a row that does not compact
    perm, used = torch.randperm(num_blocks - 1, generator=gen) + 1, 0
    for r, n in enumerate(blocks):
        table[r, :n] = perm[used:used + n]
        used += n
    rows = [0, 2, 3]  # batch rows of the compacting requests (row 1 does not compact)
    table = table[[0, 3, 1, 2]]
    plan = EvictionPlan([None] * 4, table, [Compaction(None, row, n, t) for row, n, t in zip(rows, LENGTHS, TARGETS)])
    return caches, table, plan


def _expected(caches, table, plan, sink, recent):
    out = [c.clone() for c in caches]
    for cache in out:
        for c in plan.compactions:
            keys = paged_dense_ref.gather_kv(cache, table[c.row].long(), c.length)[0]
            keep = keep_indices(KnormScorer().score(keys), c.target, sink, recent)
            compaction_ref.compact(cache, table[c.row].long(), keep)
    return out


def _method(sink, recent):
    return SimpleNamespace(scorer=KnormScorer, protected=lambda: (sink, recent), masks=False)


@pytest.mark.parametrize("group_bytes", [dense_layout.SELECTION_BYTES, 1])  # all layers together; one at a time
@pytest.mark.parametrize("fmt", [DenseFormat(D, torch.bfloat16), KeysOnly()], ids=["norms", "keys"])
def test_every_layer_at_once_is_each_layer_alone(monkeypatch, fmt, group_bytes):
    monkeypatch.setattr(dense_layout, "SELECTION_BYTES", group_bytes)
    caches, table, plan = _step()
    expect = _expected(caches, table, plan, 1, 3)
    Evictor(_method(1, 3)).run([(i, cache, fmt) for i, cache in enumerate(caches)], plan)
    assert all(torch.equal(got, want) for got, want in zip(caches, expect))
    assert not torch.equal(caches[0], _step()[0][0])  # something moved


def test_every_layer_at_once_through_triton(interpreter):  # noqa: F811
    """The Triton path of the same step: the norms of every layer in one launch, the move of
    every layer in one launch."""
    caches, table, plan = _step(seed=1)
    expect = _expected(caches, table, plan, 0, 2)
    on_device = [c.clone().to(DEV) for c in caches]
    plan = EvictionPlan(plan.caches, table.to(DEV), plan.compactions)
    with ops.use("triton"):
        Evictor(_method(0, 2)).run([(i, cache, DenseFormat(D, torch.bfloat16)) for i, cache in enumerate(on_device)],
                                   plan)
    assert all(torch.equal(got.cpu(), want) for got, want in zip(on_device, expect))


@pytest.mark.parametrize("kind", ["reference", "triton"])
def test_warm_up_moves_nothing(interpreter, kind):  # noqa: F811
    """The warm-up before serving runs the move in both launch plans and the scores, and
    leaves every cache as it was."""
    caches, _, _ = _step(seed=2)
    on_device = [c.clone().to(DEV) for c in caches]
    with ops.use(kind):
        Evictor(_method(0, 0)).warm_up([(i, cache, DenseFormat(D, torch.bfloat16)) for i, cache in enumerate(on_device)])
    assert all(torch.equal(got.cpu(), want) for got, want in zip(on_device, caches))
