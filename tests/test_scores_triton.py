"""Triton learned keep scores (one launch per layer: KVzap's linear predictor, DMS's RMSNorm +
linear adapter) vs the PyTorch reference, and the reference vs the modules the methods train
(small shapes; on CPU under Triton's interpreter)."""

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401

scores_ref, scores_triton = import_kernels("scores_ref", "scores_triton")


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


@pytest.mark.parametrize("tokens,dim,heads,rms,tile", [
    (5, 96, 3, True, {}), (9, 64, 8, False, {}), (1, 300, 2, True, {}), (3, 40, 1, True, {}),
    (259, 40, 2, True, {}),  # two tokens per program, an odd last one
    (2, 2100, 3, True, {}),  # three column steps, the last partial
    (6, 700, 5, True, {"block_t": 4, "block_d": 256, "num_warps": 2})])  # the benchmark's sweep overrides
def test_linear_scores_match_the_reference(tokens, dim, heads, rms, tile):
    g = torch.Generator().manual_seed(dim + heads)
    x = (3 * torch.randn(tokens, dim, generator=g)).to(torch.bfloat16)
    weight, bias = torch.randn(heads, dim, generator=g), torch.randn(heads, generator=g)
    gain = torch.rand(dim, generator=g) + 0.5 if rms else None
    ref = scores_ref.linear_scores(x, weight, bias, gain, 1e-6, -20.0, 5.0)
    out = scores_triton.linear_scores(x.to(DEV), weight.to(DEV), bias.to(DEV), None if gain is None else gain.to(DEV),
                                      1e-6, -20.0, 5.0, **tile).cpu()
    assert out.shape == (tokens, heads) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_the_reference_is_what_the_methods_modules_compute():
    """Bit for bit: the seam must not move a decision at the threshold on the CPU path."""
    from vllm_kvcompress.methods.dms.decisions import DMSAdapter
    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 48, generator=g).to(torch.bfloat16)
    adapter = DMSAdapter(48, 4)
    predictor = LinearPredictor(48, 4)
    with torch.no_grad():
        for p in list(adapter.parameters()) + list(predictor.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        want_dms = -adapter(x.float())
        want_kvzap = predictor(x.float())
    got_dms = scores_ref.linear_scores(x, adapter.proj.weight, adapter.proj.bias, adapter.norm.weight,
                                       adapter.norm.eps, -adapter.scale, adapter.offset)
    got_kvzap = scores_ref.linear_scores(x, predictor.proj.weight, predictor.proj.bias)
    assert torch.equal(got_dms, want_dms) and torch.equal(got_kvzap, want_kvzap)


@pytest.mark.parametrize("per_layer,heads", [(False, None), (True, None), (False, [3, 1]), (True, [2])])
def test_the_engines_scorers_give_the_hooks_scores(per_layer, heads):
    """The compiled engine's scorers (one linear head per layer through ``ops.linear_scores``)
    against the eager hooks' functions, bit for bit on the CPU, for every head selection
    (tensor parallelism) and DMS's per-layer decisions."""
    from vllm_kvcompress.methods.dms import hooks as dms_hooks
    from vllm_kvcompress.methods.dms.checkpoint import DMSDecisions
    from vllm_kvcompress.methods.dms.decisions import DMSAdapter
    from vllm_kvcompress.methods.kvzap import hooks as kvzap_hooks
    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor

    g = torch.Generator().manual_seed(1)
    adapter, predictor = DMSAdapter(32, 4), LinearPredictor(32, 4)
    with torch.no_grad():
        for p in list(adapter.parameters()) + list(predictor.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    index = None if heads is None else torch.tensor(heads)
    decisions = DMSDecisions([adapter], 64, per_layer=per_layer, source="test", heads=heads)
    x = torch.randn(6, 32, generator=g).to(torch.bfloat16)
    assert torch.equal(dms_hooks._linear_keep_scores(decisions, 0, index)(x),
                       dms_hooks.keep_scores(decisions, 0, x, index))
    assert torch.equal(kvzap_hooks._scorer(predictor, index)(x), kvzap_hooks._predict(predictor, x, index))
