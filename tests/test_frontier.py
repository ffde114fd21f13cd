"""benchmarks.frontier: each row against bf16, and each preset against its targets."""

from benchmarks import frontier


def _report():
    def cells(score, ppl):
        return {"niah@4096": {"score": score}, "perplexity@4096": {"score": 0.0, "perplexity": ppl}}

    results = {"bf16": {"cells": cells(1.0, 20.0)}, "preset-safe": {"cells": cells(1.0, 20.1)},
               "preset-balanced": {"cells": cells(0.98, 20.9)}, "snapkv-r0.8": {"error": "boom"}}
    summary = {"bf16": {"mean_accuracy": 1.0, "capacity_ratio": 1.0},
               "preset-safe": {"mean_accuracy": 1.0, "capacity_ratio": 4.24},
               "preset-balanced": {"mean_accuracy": 0.98, "capacity_ratio": 9.55}}
    return {"model": "m", "date": "d", "command": "c", "summary": summary,
            "accuracy": {"baseline": "bf16", "min_baseline": 0.8, "kept_cells": ["niah@4096", "perplexity@4096"],
                         "out_of_reach": ["ruler/qa_1@4096"], "results": results}}


def test_rows_judge_each_preset_against_its_own_targets(tmp_path):
    table = {r["config"]: r for r in frontier.rows(_report())}
    safe, balanced = table["preset-safe"], table["preset-balanced"]
    assert safe["met"] == {"capacity": True, "accuracy": True, "perplexity": True}
    assert abs(safe["perplexity_pct"] - 0.5) < 1e-9
    assert balanced["met"] == {"capacity": True, "accuracy": False, "perplexity": False}  # -2 pt, +4.5%
    assert table["snapkv-r0.8"]["error"] == "boom" and table["bf16"]["kind"] == "bf16"
    text = frontier.markdown(_report(), list(table.values()))
    assert "| preset-balanced | composition | 9.55 | 98.0 | -2.0 | 20.90 | +4.5% |" in text
    assert "accuracy NO" in text and "ruler/qa_1@4096" in text
    frontier.plot(list(table.values()), tmp_path / "f.png", "m")
    assert (tmp_path / "f.png").stat().st_size > 1000
