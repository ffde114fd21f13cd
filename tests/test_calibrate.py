"""LOOKAT calibration: deterministic codebooks in safetensors, refused for another model."""

import pytest
import torch
from safetensors import safe_open

from vllm_kvcompress.methods.lookat.codebooks import CodebookMismatch, load_codebooks
from vllm_kvcompress.offline.calibrate import main


@pytest.fixture(scope="module")
def codebook_file(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cb") / "smol.safetensors"
    main(["--model", smollm2_dir, "--out", str(out), "--m", "8", "--k", "16", "--tokens", "256", "--iters", "3"])
    return out


def test_file_layout_and_metadata(codebook_file, smollm2_dir):
    from transformers import AutoConfig

    layers, meta, dims = load_codebooks(str(codebook_file), AutoConfig.from_pretrained(smollm2_dir))
    assert dims is None  # contiguous subspaces
    assert len(layers) == 30 and layers[0].shape == (3, 8, 16, 8)
    assert meta["m"] == "8" and meta["K"] == "16" and meta["tokens"] == "256" and meta["head_dim"] == "64"
    # keys spread over the whole 8K context (two random positions each), RoPE base recorded
    assert meta["positions"] == "8192" and meta["copies"] == "2" and meta["rope_theta"] == "100000.0"
    assert open(codebook_file, "rb").read(8) != b"\x80\x04\x95"  # not a pickle
    with safe_open(str(codebook_file), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"layer.{i}" for i in range(30))


def test_same_seed_same_codebooks(codebook_file, smollm2_dir, tmp_path):
    again = tmp_path / "again.safetensors"
    main(["--model", smollm2_dir, "--out", str(again), "--m", "8", "--k", "16", "--tokens", "256", "--iters", "3"])
    with safe_open(str(codebook_file), framework="pt") as a, safe_open(str(again), framework="pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_another_model_is_refused(codebook_file, smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    config.num_key_value_heads = 2
    with pytest.raises(CodebookMismatch, match="num_kv_heads: file has 3, model has 2"):
        load_codebooks(str(codebook_file), config)


def test_bad_k_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "x", "--out", "y", "--k", "300"])
    assert "--k must be in 2..256" in capsys.readouterr().err


def test_rope_pairs_grouping_is_stored_and_used(smollm2_dir, tmp_path):
    from transformers import AutoConfig

    from vllm_kvcompress.offline.pq import subspace_dims

    out = tmp_path / "pairs.safetensors"
    main(["--model", smollm2_dir, "--out", str(out), "--m", "8", "--k", "16", "--tokens", "256", "--iters", "3",
          "--grouping", "rope_pairs"])
    layers, meta, dims = load_codebooks(str(out), AutoConfig.from_pretrained(smollm2_dir))
    assert meta["grouping"] == "rope_pairs" and torch.equal(dims, subspace_dims(64, 8, "rope_pairs"))
    assert dims[0].tolist() == [0, 1, 2, 3, 32, 33, 34, 35]


def test_missing_file_names_the_command(smollm2_dir, tmp_path):
    from transformers import AutoConfig

    with pytest.raises(CodebookMismatch, match="does not exist; make one with `python -m vllm_kvcompress.offline.calibrate"):
        load_codebooks(str(tmp_path / "nope.safetensors"), AutoConfig.from_pretrained(smollm2_dir))
