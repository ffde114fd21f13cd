"""Registration: enum member, pickling into fresh processes, CPU routing."""

import pickle
import subprocess
import sys

import pytest

from vllm_kvcompress import BACKEND_NAME, BACKEND_PATH
from vllm_kvcompress.vllm.plugin import register


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    register()  # idempotent


def test_member_and_any_case_name():
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum[BACKEND_NAME]
    assert member.get_path() == BACKEND_PATH
    for spelling in ("kvcompress", "KVCompress", "KVCOMPRESS"):
        assert AttentionConfig.validate_backend_before(spelling) is member


def test_member_unpickles_in_a_fresh_process_before_plugins_load():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    payload = pickle.dumps({"backend": AttentionBackendEnum[BACKEND_NAME]})
    code = (
        "import pickle, sys\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "assert 'KVCOMPRESS' not in E.__members__, 'plugin loaded too early for this test'\n"
        "obj = pickle.loads(sys.stdin.buffer.read())\n"
        "assert obj['backend'] is E['KVCOMPRESS']\n"
        "print(obj['backend'].get_path())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120, env={"VLLM_PLUGINS": "", "PATH": ""})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip().endswith(BACKEND_PATH)


def test_cpu_platform_routes_only_kvcompress():
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    assert current_platform.is_cpu()
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128)
    get = current_platform.get_attn_backend_cls
    assert get(AttentionBackendEnum[BACKEND_NAME], cfg) == BACKEND_PATH
    cpu_path = AttentionBackendEnum.CPU_ATTN.get_path()
    assert get(AttentionBackendEnum.CPU_ATTN, cfg) == cpu_path
    assert get(None, cfg) == cpu_path
    with pytest.raises(ValueError, match="kvcompress cannot run this attention layer.*sliding window not supported"):
        get(AttentionBackendEnum[BACKEND_NAME], cfg._replace(has_sliding_window=True))
    with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
        get(AttentionBackendEnum[BACKEND_NAME], cfg._replace(kv_cache_dtype="fp8"))


def test_importing_the_plugin_initialises_no_cuda():
    code = "import vllm_kvcompress.vllm.plugin as p, torch; p.register(); import vllm_kvcompress.vllm.backend; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
