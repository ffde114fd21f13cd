"""KVzap groundwork (engine-neutral): the KVzip+ oracle against a loop over its
definition, ridge against its normal equations, the MLP recipe, and the metrics."""

import math

import torch

from vllm_kvcompress.offline.kvzap_fit import fit_mlp, fit_ridge, head_output_norms, kvzip_plus_targets, quality


def test_oracle_matches_its_definition():
    torch.manual_seed(0)
    kv_heads, group, head_dim, hidden, length, repeats = 2, 3, 4, 10, 7, 5
    values = torch.randn(kv_heads, length, head_dim)
    o_proj = torch.randn(hidden, kv_heads * group * head_dim)
    attention = torch.softmax(torch.randn(kv_heads * group, repeats, length), -1)
    hidden_norms = torch.rand(repeats) + 0.5
    norms = head_output_norms(values, o_proj, group)
    targets = kvzip_plus_targets(attention, norms, hidden_norms, group)
    for h in range(kv_heads):
        for i in range(length):
            best = 0.0
            for g in range(h * group, (h + 1) * group):
                w_o = o_proj[:, g * head_dim:(g + 1) * head_dim]
                contribution = float(torch.linalg.vector_norm(w_o @ values[h, i]))
                for j in range(repeats):
                    best = max(best, float(attention[g, j, i]) * contribution / float(hidden_norms[j]))
            assert math.isclose(float(targets[h, i]), math.log(best), rel_tol=1e-4)


def test_ridge_solves_its_normal_equations():
    torch.manual_seed(1)
    x = torch.randn(300, 6) * 3 + 1
    w = torch.randn(2, 6)
    y = x @ w.T + 0.5 + 0.1 * torch.randn(300, 2)
    model = fit_ridge(x, y, alpha=1.0)
    pred = model(x)
    residual = (y - pred).double()
    # gradient of ||y - xW - b||^2 + alpha ||W||^2 is zero at the solution
    grad_w = -2 * residual.T @ x.double() + 2 * model.proj.weight.double()
    assert grad_w.abs().max() < 1e-2 and residual.sum(0).abs().max() < 1e-2
    assert quality(pred, y)["r2"] > 0.99


def test_mlp_recipe_learns_a_nonlinear_target():
    torch.manual_seed(2)
    x = torch.randn(4096, 32)
    y = torch.stack([x[:, 0].abs(), x[:, 1].abs()], 1)  # no linear part: ridge cannot fit it
    losses = []
    model = fit_mlp(x, y, epochs=30, batch=128, progress=losses.append, width=32)
    assert losses[-1] < losses[0] / 3
    with torch.no_grad():
        mlp, linear = quality(model(x), y), quality(fit_ridge(x, y)(x).detach(), y)
    assert mlp["r2"] > 0.9 and linear["r2"] < 0.1  # the nonlinearity is learnt


def test_predictor_files_round_trip_and_mismatches_are_refused(tmp_path):
    import types

    import pytest

    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor, MLPPredictor, PredictorFileError, load_predictors
    from vllm_kvcompress.offline.kvzap_train import save_predictors

    config = types.SimpleNamespace(num_hidden_layers=2, hidden_size=16, num_key_value_heads=3)
    for kind, make in (("linear", lambda: LinearPredictor(16, 3)), ("mlp", lambda: MLPPredictor(16, 3))):
        modules = [make(), make()]
        path = tmp_path / f"{kind}.safetensors"
        save_predictors(path, modules, kind, "toy", config)
        loaded = load_predictors(path, 2, 16, 3)
        x = torch.randn(5, 16)
        assert all(torch.equal(a(x), b(x)) for a, b in zip(modules, loaded))
    with pytest.raises(PredictorFileError, match=r"made for \(layers, hidden, KV heads\) = \(2, 16, 3\)"):
        load_predictors(tmp_path / "mlp.safetensors", 30, 576, 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PredictorFileError, match="cannot read safetensors") as info:
        load_predictors(bad, 2, 16, 3)
    assert str(bad) in str(info.value)


def test_repeat_prompt_locates_both_copies(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.kvzap_train import repeat_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."
    ids, orig, rep, n = repeat_prompt(tokenizer, text)
    assert ids[orig:orig + n] == ids[rep:rep + n] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rep == len(ids) - n and orig + n < rep


def test_published_layout_loads(tmp_path):
    import json

    import pytest
    from safetensors.torch import save_file

    from vllm_kvcompress.methods.kvzap.predictors import PredictorFileError, load_published_predictors

    torch.manual_seed(3)
    mlp = {f"layers.{i}.{j}.{p}": torch.randn(*((8, 16) if j == 0 else (3, 8)) if p == "weight" else ((8,) if j == 0 else (3,)))
           for i in range(2) for j in (0, 2) for p in ("weight", "bias")}
    save_file(mlp, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kvzap", "input_dim": 16, "output_dim": 3,
                                                      "n_modules": 2, "hidden_dim": 8}))
    loaded = load_published_predictors(tmp_path, 2, 16, 3)
    x = torch.randn(4, 16)
    want = torch.nn.functional.gelu(x @ mlp["layers.1.0.weight"].T + mlp["layers.1.0.bias"]) @ mlp["layers.1.2.weight"].T \
        + mlp["layers.1.2.bias"]
    assert torch.allclose(loaded[1](x), want, atol=1e-5)
    with pytest.raises(PredictorFileError, match=r"model has \(30, 576, 3\)"):
        load_published_predictors(tmp_path, 30, 576, 3)
