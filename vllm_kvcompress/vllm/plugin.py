"""vLLM ``general_plugins`` entry point, called once in every vLLM process.

It must stay idempotent and cheap, import nothing device-specific, and never raise
for users who do not select kvcompress.
"""

from __future__ import annotations

import functools

from vllm_kvcompress import BACKEND_NAME, BACKEND_PATH


def restore_backend_member(name: str, path: str):
    """Unpickle target for the dynamic enum member.

    Spawned EngineCore/Worker processes unpickle ``vllm_config`` before vLLM loads
    plugins there; the member must be (re)created on the spot or unpickling fails.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name not in AttentionBackendEnum.__members__:
        register_backend(name, path)
        _make_picklable(AttentionBackendEnum[name])
    return AttentionBackendEnum[name]


def _make_picklable(member) -> None:
    reduce = functools.partial(_reduce_member, member._name_, member._value_)
    object.__setattr__(member, "__reduce_ex__", reduce)


def _reduce_member(name: str, path: str, _protocol: int):
    return restore_backend_member, (name, path)


def _register_backend() -> None:
    restore_backend_member(BACKEND_NAME, BACKEND_PATH)


def _route_cpu_platform() -> None:
    """vLLM's CPU platform ignores the selected backend and always returns CPU_ATTN.
    Route only the kvcompress selection to us; every other choice is untouched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    if getattr(platform_cls.get_attn_backend_cls, "_kvcompress_route", False):
        return
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", None) == BACKEND_NAME:
            from vllm_kvcompress.vllm.backend import KVCompressBackend

            reasons = KVCompressBackend.validate_configuration(
                device_capability=None, **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError(
                    f"kvcompress cannot run this attention layer ({attn_selector_config!r}): {', '.join(reasons)}"
                )
            return selected_backend.get_path()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._kvcompress_route = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _validate_at_config_time() -> None:
    """Check the finished config in the front-end process (``LLM``, ``vllm serve``)
    before any engine process is spawned."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, "_kvcompress_checked", False):
        return
    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        from vllm_kvcompress.vllm.startup import validate_vllm_config

        validate_vllm_config(vllm_config, getattr(self, "async_scheduling", None))
        return vllm_config

    create_engine_config._kvcompress_checked = True
    EngineArgs.create_engine_config = create_engine_config


def _validate_request_settings() -> None:
    """Per-request settings (``SamplingParams.extra_args["kvcompress"]``) are checked in
    the front end, so a bad request gets an error instead of reaching the scheduler."""
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor._validate_params, "_kvcompress_checked", False):
        return
    original = InputProcessor._validate_params

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        from vllm_kvcompress.vllm.policy import has_request_settings

        extra_args = getattr(params, "extra_args", None)
        if has_request_settings(extra_args):
            from vllm.exceptions import VLLMValidationError

            from vllm_kvcompress.config import KVCompressConfigError
            from vllm_kvcompress.vllm.startup import check_request_settings

            try:
                check_request_settings(self.vllm_config, extra_args)
            except KVCompressConfigError as exc:
                # vLLM's client-error type: the API answers 400 with this message (a bare
                # ValueError here becomes an empty 500 from AsyncLLM.generate).
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return result

    _validate_params._kvcompress_checked = True
    InputProcessor._validate_params = _validate_params


def register() -> None:
    _register_backend()
    _route_cpu_platform()
    _validate_at_config_time()
    _validate_request_settings()
