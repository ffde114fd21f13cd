"""Corrupt, truncated, foreign or pickled artefact files are refused at start-up (config
time, before any engine process), naming the option, the file and the reason; nothing
is ever unpickled. Per-request settings of the wrong type are covered by
tests/test_eviction_policy.py (messages) and tests/test_soak.py (HTTP 400 under load)."""

import pickle
from pathlib import Path

import pytest

from vllm_kvcompress.config import KVCompressConfigError

ARTEFACTS = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts"


class _Payload:
    """Unpickling this would create the marker file: proof that nobody unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _engine_config(model_dir, settings):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dir, max_model_len=2048, enforce_eager=True, attention_backend="kvcompress",
                      additional_config={"kvcompress": settings}).create_engine_config()


def _real_file(kind: str, tmp_path) -> Path:
    if kind == "codebooks":
        from vllm_kvcompress.offline.calibrate import ensure_codebooks

        return Path(ensure_codebooks("smollm2-135m", 8, k=16, tokens=512, iters=3))
    return {"head_scores": ARTEFACTS / "head_scores" / "smollm2-135m.json",
            "kvzap_predictor": ARTEFACTS / "kvzap" / "smollm2-135m" / "kvzap-linear.safetensors",
            "dms_adapters": ARTEFACTS / "dms" / "smollm2-135m" / "dms-cr4.safetensors"}[kind]


SETTINGS = {
    "codebooks": {"method": "lookat"},
    "head_scores": {"method": "headkv", "max_kv_tokens": 128},
    "kvzap_predictor": {"method": "kvzap", "kvzap_threshold": -4.0},
    "dms_adapters": {"method": "dms"},
}


@pytest.mark.parametrize("kind", sorted(SETTINGS))
@pytest.mark.parametrize("damage", ["pickle", "truncated", "empty", "another_kind"])
def test_damaged_artefact_is_refused_with_the_file_and_reason(smollm2_dir, tmp_path, kind, damage):
    real = _real_file(kind, tmp_path)
    bad = tmp_path / f"bad{real.suffix}"
    marker = tmp_path / "unpickled"
    if damage == "pickle":
        bad.write_bytes(pickle.dumps(_Payload(marker)))
    elif damage == "truncated":
        data = real.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # a valid artefact of another kind: DMS adapters given as KVzap predictors, etc.
        other = {"codebooks": "dms_adapters", "head_scores": "kvzap_predictor", "kvzap_predictor": "dms_adapters",
                 "dms_adapters": "kvzap_predictor"}[kind]
        bad.write_bytes(_real_file(other, tmp_path).read_bytes())
    with pytest.raises(KVCompressConfigError) as error:
        _engine_config(smollm2_dir, {**SETTINGS[kind], kind: str(bad)})
    message = str(error.value)
    assert f"additional_config.kvcompress.{kind}" in message and str(bad) in message, message
    assert not marker.exists()
    print(f"{kind}/{damage}: {message}")


def test_no_loader_can_unpickle():
    """Artefacts are safetensors or JSON only: no pickle-capable loader anywhere in the code."""
    import re

    root = Path(__file__).parents[1]
    pattern = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bnp\.load\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    offenders = [f"{path.relative_to(root)}:{n}" for folder in ("vllm_kvcompress", "kernels", "benchmarks")
                 for path in (root / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
