"""benchmarks.run: argument handling, and the --quick smoke of both suites (engine)."""

import json

import pytest

from benchmarks.run import main, parse_args, summarise


def test_baseline_first_and_one_line_configs():
    args = parse_args(["--configs", "fp8", "--config", 'mine={"attention_backend": "kvcompress"}'])
    assert list(args.configs) == ["bf16", "fp8", "mine"]
    assert args.model == "qwen2.5-coder-0.5b" and args.accuracy_suite == "full" and args.min_baseline == 0.8
    quick = parse_args(["--quick"])
    assert quick.model == "smollm2-135m" and quick.accuracy_suite == "quick" and quick.min_baseline == 0.0


def test_lookat_configs_by_name(monkeypatch):
    import vllm_kvcompress.offline.calibrate as calibrate

    made = []
    monkeypatch.setattr(calibrate, "ensure_codebooks", lambda model, m: made.append((model, m)) or f"/cb/{model}-m{m}")
    args = parse_args(["--configs", "lookat-m8-v4,lookat-m16-v16-exact", "--model", "qwen2.5-coder-1.5b"])
    assert made == [("qwen2.5-coder-1.5b", 8), ("qwen2.5-coder-1.5b", 16)]
    settings = args.configs["lookat-m8-v4"]["additional_config"]["kvcompress"]
    assert settings == {"method": "lookat", "codebooks": "/cb/qwen2.5-coder-1.5b-m8", "value_bits": 4, "current_tokens": "coded"}
    assert args.configs["lookat-m16-v16-exact"]["additional_config"]["kvcompress"]["current_tokens"] == "exact"


@pytest.mark.parametrize("argv, message", [
    (["--configs", "lookat-m8-v3"], "unknown config 'lookat-m8-v3'"),
    (["--configs", "bogus"], "unknown config 'bogus'"),
    (["--suites", "speed"], "unknown suite 'speed'"),
])
def test_bad_arguments_name_the_allowed_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and "allowed" in err


def test_summary_counts_eviction_and_bytes():
    configs = {"bf16": {}, "half": {"additional_config": {"kvcompress": {"compression_ratio": 0.5}}}}
    cell = lambda score: {"n": 1, "score": score}  # noqa: E731
    accuracy = {
        "kept_cells": ["niah@1024", "perplexity@256"],
        "results": {
            "bf16": {"cells": {"niah@1024": cell(1.0), "perplexity@256": {**cell(2.0), "perplexity": 7.4}},
                     "bytes_per_token": 100.0, "kv_cache_tokens": 1000, "wall_s": 1.0},
            "half": {"cells": {"niah@1024": cell(0.5), "perplexity@256": {**cell(2.5), "perplexity": 12.2}},
                     "bytes_per_token": 50.0, "kv_cache_tokens": 2000, "wall_s": 1.0},
        },
    }
    s = summarise(configs, accuracy, None)
    assert s["bf16"]["mean_accuracy"] == 1.0 and s["bf16"]["compression"] == 0.0 and s["bf16"]["capacity_ratio"] == 1.0
    # Half the bytes per token and half the tokens kept: a quarter of the memory, 4x the context.
    assert s["half"]["compression"] == pytest.approx(0.75) and s["half"]["capacity_ratio"] == pytest.approx(4.0)
    assert s["half"]["mean_accuracy"] == 0.5 and s["half"]["accuracy_ratio"] == 0.5
    # Ring layouts (DMS): no declared ratio; the pages the requests really held, weighted by length.
    configs["ring"] = {"additional_config": {"kvcompress": {"method": "dms"}}}
    accuracy["results"]["ring"] = {**accuracy["results"]["half"], "kept_fractions": [0.1, 0.5],
                                   "kept_pages": [[30, 100], [150, 300]]}
    ring = summarise(configs, accuracy, None)["ring"]
    assert ring["evicted_fraction"] == pytest.approx(1 - 180 / 400)
    assert ring["capacity_ratio"] == pytest.approx(2.0 * 400 / 180)


@pytest.mark.engine
def test_quick_run_both_suites(smollm2_dir, tmp_path):
    report = main(["--quick", "--out", str(tmp_path), "--configs", "bf16,kvcompress-none"])
    cap = report["capacity"]["results"]
    bf16, kvc = cap["bf16"], cap["kvcompress-none"]
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) bf16 values = 23,040 bytes per token.
    assert bf16["bytes_per_token"] == kvc["bytes_per_token"] == 23040
    assert kvc["kv_capacity_tokens"] == bf16["kv_capacity_tokens"] > 0 and kvc["capacity_ratio"] == 1.0
    for r in (bf16, kvc):
        c = r["concurrency"]
        fit = c["trials"][str(c["predicted_fit"])]
        assert fit["preemptions"] == 0 and fit["peak_running"] == c["predicted_fit"]
        assert c["max_running_without_preemption"] == c["predicted_fit"]
        assert r["throughput"]["output_tokens"] == 2 * 16 and r["throughput"]["output_tokens_per_s"] > 0
    assert kvc["throughput_ratio"] > 0

    acc = report["accuracy"]
    cells = {"passkey@512", "niah@512", "ruler/vt@1024", "perplexity@256"}
    assert set(acc["kept_cells"]) == cells  # --quick keeps every cell (threshold 0)
    for name in ("bf16", "kvcompress-none"):
        result = acc["results"][name]
        assert set(result["cells"]) == cells and result["bytes_per_token"] == 23040
        for c in result["cells"].values():
            assert 0.0 <= c["score"] <= 1.0 or "perplexity" in c
    ppl = [acc["results"][n]["cells"]["perplexity@256"]["perplexity"] for n in ("bf16", "kvcompress-none")]
    assert 1.0 < ppl[0] < 1000 and abs(ppl[1] / ppl[0] - 1) < 0.1  # same cache, bf16 noise only
    assert report["summary"]["kvcompress-none"]["compression"] == 0.0

    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written["accuracy"]["results"]) == {"bf16", "kvcompress-none"}
    md = (tmp_path / "results.md").read_text()
    assert "| ruler/vt@1024 | 1 |" in md and "| kvcompress-none |" in md
    for plot in ("accuracy_vs_compression.png", "capacity_vs_accuracy.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_budget_configs_by_name():
    args = parse_args(["--configs", "headkv-b128,snapkv-b64,knorm-b512"])
    headkv = args.configs["headkv-b128"]["additional_config"]["kvcompress"]
    assert headkv["method"] == "headkv" and headkv["max_kv_tokens"] == 128
    assert headkv["head_scores"].endswith("artefacts/head_scores/qwen2.5-coder-0.5b.json")
    assert args.configs["snapkv-b64"]["additional_config"]["kvcompress"] == {"method": "snapkv", "max_kv_tokens": 64}
    assert args.configs["knorm-b512"]["additional_config"]["kvcompress"]["max_kv_tokens"] == 512


def test_perplexity_change_per_document_with_its_spread():
    import math

    from benchmarks.run import accuracy_markdown, perplexity_change

    def cell(nlls):
        return {"n": len(nlls), "score": sum(nlls) / len(nlls), "perplexity": math.exp(sum(nlls) / len(nlls)),
                "samples": [{"score": x} for x in nlls]}

    base = cell([3.0, 3.5, 2.5])
    # +10%, +4% and -2% on the three documents: mean +4, s.e. sqrt((36 + 0 + 36) / 2 / 3) = 3.46
    other = cell([3.0 + math.log(1.1), 3.5 + math.log(1.04), 2.5 + math.log(0.98)])
    assert perplexity_change(base, other) == "+4.0 ± 3.5"
    assert perplexity_change(base, None) == "–"
    accuracy = {"baseline": "bf16", "min_baseline": 0.8, "kept_cells": ["perplexity@4096"], "out_of_reach": {},
                "results": {"bf16": {"cells": {"perplexity@4096": base}},
                            "x": {"cells": {"perplexity@4096": other}}}}
    lines = accuracy_markdown(accuracy, {"bf16": {}, "x": {}})
    assert any(line.startswith("| perplexity@4096: change per document") and "+4.0 ± 3.5" in line for line in lines)
