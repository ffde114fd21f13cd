import argparse
import pytest

from benchmarks.capacity import parse_config
from vllm_kvcompress.harness.capacity import peak_overlap


def test_peak_overlap():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 10), (1, 2), (3, 4)]) == 2
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # back to back: never two at once
    assert peak_overlap([(0, 5)] * 4 + [(6, 7)]) == 4


def test_config_is_one_line():
    assert parse_config('kvc={"attention_backend": "kvcompress"}') == ("kvc", {"attention_backend": "kvcompress"})
    assert parse_config("knorm-r0.5") == ("knorm-r0.5", None)  # a named config, resolved for --model later
    for bad in ("x={not json", "x=[1]", "={}"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_config(bad)


def test_unknown_named_config_is_refused(capsys):
    from benchmarks.capacity import main

    with pytest.raises(SystemExit):
        main(["--config", "noequals"])
    assert "expected NAME=JSON or one of" in capsys.readouterr().err
