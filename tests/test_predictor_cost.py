"""benchmarks.predictor_cost: the learned methods' scoring per step, as the engine's op scores."""

import json

import torch

from benchmarks import predictor_cost


def test_scorers_are_the_engines_and_the_share_comes_from_the_same_sessions_row(tmp_path, capsys):
    for kind in predictor_cost.KINDS:
        score = predictor_cost.scorers(kind, 2, 16, 4, torch.device("cpu"))
        out = score[1](torch.randn(5, 16, dtype=torch.bfloat16))
        assert out.shape == (5, 4) and out.dtype == torch.float32
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rows": [{"config": "dms-4x", "tpot_ms_b32": 2.0}]}))
    predictor_cost.main(["--device", "cpu", "--kinds", "dms", "kvzap-mlp", "--tokens", "32", "4", "--layers", "2",
                         "--hidden", "16", "--kv-heads", "4", "--repeats", "3", "--summary", str(summary),
                         "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "predictor_cost.json").read_text())
    # each kind and size with the reference ops, then with the engine's choice (the ratio on the second)
    assert [(r["kind"], r["tokens"], r["kernels"]) for r in rows] == [
        (kind, tokens, kernels) for kind in ("dms", "kvzap-mlp") for tokens in (32, 4) for kernels in ("reference", "auto")]
    assert all(r["x_reference"] == round(ref["ms_per_step"] / r["ms_per_step"], 2) for ref, r in zip(rows[::2], rows[1::2]))
    dms = rows[1]
    assert dms["ms_per_step"] > 0 and dms["predictor_pct_b32"] == round(100 * dms["ms_per_step"] / 2.0, 2)
    assert [r for r in rows if "predictor_pct_b32" in r] == [dms]  # no row for MLP; B=4 is no TPOT stage
