"""`vllm serve --attention-backend kvcompress` through the OpenAI-compatible API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.engine

VLLM = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(model_dir, port, *extra):
    return [VLLM, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 29), *extra]


def test_chat_completion_through_server(smollm2_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        serve_args(smollm2_dir, port, "--attention-backend", "kvcompress",
                   "--additional-config", json.dumps({"kvcompress": {"method": "none"}})),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not become healthy in 300 s")
        reply = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": smollm2_dir,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 24,
        })
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        text = (tmp_path / "server.log").read_text()
        assert "kvcompress attention active: method=none, 30 layers" in text, text[-4000:]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.returncode is not None


def test_bad_config_stops_serve_before_the_engine(smollm2_dir):
    proc = subprocess.run(
        serve_args(smollm2_dir, free_port(), "--attention-backend", "KVCompress",
                   "--additional-config", json.dumps({"kvcompress": {"method": "bogus"}})),
        capture_output=True, text=True, timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "additional_config.kvcompress.method: unknown method 'bogus'; allowed: none" in output
    assert "Initializing a V1 LLM engine" not in output


def test_offline_batch_file_through_run_batch(smollm2_dir, tmp_path):
    """`vllm run-batch`: an OpenAI batch file processed offline with kvcompress."""
    questions = ["What is the capital of France?", "What is the capital of Italy?", "What is the capital of Japan?"]
    requests_file = tmp_path / "batch.jsonl"
    requests_file.write_text("".join(
        json.dumps({
            "custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": smollm2_dir, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 24},
        }) + "\n"
        for i, q in enumerate(questions)
    ))
    results_file = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [VLLM, "run-batch", "-i", str(requests_file), "-o", str(results_file), "--model", smollm2_dir,
         "--attention-backend", "kvcompress", "--enforce-eager", "--max-model-len", "2048",
         "--kv-cache-memory-bytes", str(1 << 29)],
        capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "kvcompress attention active: method=none" in output
    results = {r["custom_id"]: r for r in map(json.loads, results_file.read_text().splitlines())}
    assert sorted(results) == ["q0", "q1", "q2"]
    answers = [results[f"q{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(3)]
    assert "Paris" in answers[0], answers


def test_each_hostile_setting_gets_a_400_naming_it_and_the_server_keeps_serving(smollm2_dir, tmp_path):
    from vllm_kvcompress.harness.soak import HOSTILE, served

    settings = {"kvcompress": {"method": "knorm", "compression_ratio": 0.5}}
    flags = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 28),
             "--attention-backend", "kvcompress", "--additional-config", json.dumps(settings)]
    cases = [*HOSTILE,  # the soak's cases, plus two it does not send
             ({"kvcompress_max_kv_tokens": 2.5}, "max_kv_tokens must be an integer"),
             ({"kvcompress_max_kv_tokens": 64, "kvcompress_compression_ratio": 0.5}, "at most one")]
    with served(smollm2_dir, flags, tmp_path / "server.log") as (base, server):
        for xargs, words in cases:
            for path, body in (("completions", {"prompt": "Hello"}),
                               ("chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})):
                reply = requests.post(f"{base}/v1/{path}", timeout=60,
                                      json={"model": smollm2_dir, "max_tokens": 4, "vllm_xargs": xargs, **body})
                assert reply.status_code == 400, (path, xargs, reply.status_code, reply.text[:300])
                assert words in reply.text and "kvcompress" in reply.text, (path, xargs, reply.text[:300])
        # Still serving, and a valid per-request setting is taken.
        reply = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": smollm2_dir, "prompt": "Hello", "max_tokens": 4,
            "vllm_xargs": {"kvcompress_compression_ratio": 0.25}})
        assert reply.status_code == 200, reply.text[:300]
        assert server.poll() is None
