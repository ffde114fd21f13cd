"""DMS decision heads from disk: our trainer's file round-trips; an official
Model-Optimizer adapter checkpoint (config.json ``dms_*`` keys, ``dms_proj_alpha*``
tensors in the model's shards) loads with its own scale, offset and window; mismatches
are refused with the file and the reason."""

import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_kvcompress.methods.dms.hooks import keep_scores, residual_stream
from vllm_kvcompress.methods.dms.checkpoint import DMSCheckpointError, checkpoint_window, load_decisions

LAYERS, HIDDEN, KV = 2, 16, 2


def _trained_file(tmp_path):
    from vllm_kvcompress.offline.dms_train import save_adapters
    from vllm_kvcompress.methods.dms.decisions import DMSAdapter

    torch.manual_seed(0)
    adapters = torch.nn.ModuleList(DMSAdapter(HIDDEN, KV) for _ in range(LAYERS))
    for a in adapters:
        torch.nn.init.normal_(a.proj.weight, std=0.1)
        torch.nn.init.normal_(a.norm.weight, mean=1.0, std=0.1)
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, type("R", (), {"adapters": adapters})(),
                  {"num_layers": LAYERS, "hidden_size": HIDDEN, "num_kv_heads": KV, "window": 64, "step": 1})
    return path, adapters


def test_trainer_file_round_trips_and_gives_keep_scores(tmp_path):
    path, adapters = _trained_file(tmp_path)
    decisions = load_decisions(str(path), LAYERS, HIDDEN, KV)
    assert decisions.window == 64 == checkpoint_window(str(path)) and not decisions.per_layer
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(keep_scores(decisions, 1, x), -adapters[1](x))


@pytest.mark.parametrize("shape,message", [((3, HIDDEN, KV), "num_layers=2, the model has 3"),
                                           ((LAYERS, HIDDEN, 4), "num_kv_heads=2, the model has 4")])
def test_trainer_file_for_another_model_is_refused(tmp_path, shape, message):
    path, _ = _trained_file(tmp_path)
    with pytest.raises(DMSCheckpointError, match=message):
        load_decisions(str(path), *shape)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(DMSCheckpointError, match="no such file"):
        load_decisions(str(tmp_path / "nope.safetensors"), LAYERS, HIDDEN, KV)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DMSCheckpointError, match="not a readable safetensors file"):
        load_decisions(str(bad), LAYERS, HIDDEN, KV)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(DMSCheckpointError, match="metadata format is 'something-else'"):
        load_decisions(str(other), LAYERS, HIDDEN, KV)


def _official(tmp_path, **config):
    torch.manual_seed(1)
    folder = tmp_path / "Qwen3-DMS"
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(4, HIDDEN)}
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = torch.randn(KV, HIDDEN) * 0.1
        tensors[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = 1 + torch.randn(HIDDEN) * 0.1
    save_file(tensors, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "num_key_value_heads": KV, "rms_norm_eps": 1e-6,
        "dms_separate_alpha": True, "dms_window_size": 32, "dms_alpha_scale": 50.0,
        "dms_initial_alpha_offset": 2.0, "dms_alpha_per": "head", **config}))
    return folder, tensors


def test_official_adapter_checkpoint_loads_with_its_scale_offset_and_window(tmp_path):
    folder, tensors = _official(tmp_path)
    decisions = load_decisions(str(folder), LAYERS, HIDDEN, KV)
    assert decisions.window == 32 == checkpoint_window(str(folder))
    x = torch.randn(3, HIDDEN)
    w, g = tensors["model.layers.1.self_attn.dms_proj_alpha.weight"], \
        tensors["model.layers.1.self_attn.dms_proj_alpha_norm.weight"]
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    with torch.no_grad():
        torch.testing.assert_close(keep_scores(decisions, 1, x), -(50.0 * normed @ w.T - 2.0), atol=1e-5, rtol=1e-5)


def test_official_per_layer_decisions_use_kv_head_zero(tmp_path):
    folder, _ = _official(tmp_path, dms_alpha_per="layer")
    decisions = load_decisions(str(folder), LAYERS, HIDDEN, KV)
    with torch.no_grad():
        scores = keep_scores(decisions, 0, torch.randn(4, HIDDEN))
    assert torch.equal(scores[:, 0], scores[:, 1])


def test_official_single_neuron_checkpoint_decides_from_the_query_channel(tmp_path):
    from vllm_kvcompress.methods.dms.hooks import query_channel_scores

    folder, _ = _official(tmp_path, dms_separate_alpha=False)
    decisions = load_decisions(str(folder), LAYERS, HIDDEN, KV)
    assert decisions.single_neuron and decisions.adapters == [] and decisions.window == 32
    query = torch.randn(5, 4 * 8)  # [T, Hq * D]: 4 query heads of 8 channels, 2 KV heads
    want = -(50.0 * query.view(5, 4, 8)[:, [0, 2], 7] - 2.0)  # last channel of each group's first head
    torch.testing.assert_close(query_channel_scores(decisions, query, 4, KV), want)


@pytest.mark.parametrize("config,message", [({"dms_disable_eviction": True}, "dms_disable_eviction is true"),
                                            ({"dms_alpha_per": "token"}, "dms_alpha_per='token'; allowed: head, layer"),
                                            ({"hidden_size": 32}, "hidden_size=32, the model has 16")])
def test_official_checkpoints_that_cannot_be_served_are_refused(tmp_path, config, message):
    folder, _ = _official(tmp_path, **config)
    with pytest.raises(DMSCheckpointError, match=message):
        load_decisions(str(folder), LAYERS, HIDDEN, KV)


def test_hook_reads_the_residual_stream_before_the_input_norm():
    hidden, residual, positions = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN), torch.arange(3)
    assert torch.equal(residual_stream((positions, hidden, residual), {}), hidden + residual)
    assert torch.equal(residual_stream((positions, hidden, None), {}), hidden)  # first layer
    assert torch.equal(residual_stream((positions,), {"hidden_states": hidden, "residual": residual}), hidden + residual)
