"""Method ``lookat``: keys stored as product-quantization codes, logits from per-query ADC
lookup tables; values at 16, 8 or 4 bits. The row format is :mod:`.format`, the codebook
files :mod:`.codebooks` (made by ``python -m vllm_kvcompress.offline.calibrate``)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvcompress.methods.base import (KVCompressConfigError, Method, Settings, check_choice, check_path, key_name,
                                          setting)

VALUE_BITS = (16, 8, 4)
CURRENT_TOKENS = ("coded", "exact")


@dataclass(frozen=True)
class LookatSettings(Settings):
    codebooks: str | None = setting(
        None, "LOOKAT: codebook file from `python -m vllm_kvcompress.offline.calibrate` (required for `lookat`; "
              "its m sets the codes per key).")
    value_bits: int = setting(
        16, "LOOKAT: value storage, 16 (model's bf16/fp16), 8 (int8) or 4 (int4), per-token per-head scales.")
    current_tokens: str = setting(
        "coded", "LOOKAT: `coded` reads the step's own tokens back from the coded cache (output independent of "
                 "chunking and prefix caching); `exact` attends them with their exact keys/values.")

    def validate(self) -> None:
        check_path("codebooks", self.codebooks, "lookat",
                   "a file made by `python -m vllm_kvcompress.offline.calibrate --model MODEL --out FILE`")
        check_choice("value_bits", self.value_bits, VALUE_BITS)
        check_choice("current_tokens", self.current_tokens, CURRENT_TOKENS)


class Lookat(Method):
    name = "lookat"
    Settings = LookatSettings
    summary = "stores keys as PQ codes and scores them with ADC lookup tables"

    def cuda_refusal(self) -> str | None:
        if self.settings.current_tokens == "exact":
            # The Triton decode reads every token from the coded rows; the PyTorch op that
            # swaps in the exact current tokens gathers a batch's whole context per layer,
            # which a CUDA graph sized for max_model_len cannot afford.
            return (f"{key_name('current_tokens')}: 'exact' has no GPU decode kernel yet; on CUDA use 'coded' "
                    "(the default)")
        return None

    def check_model(self, shape, hf_config, block_size, tp_size) -> None:
        """A codebook file for this very model, whose m fits the cache layout."""
        from vllm_kvcompress.methods.lookat.codebooks import CodebookMismatch, check_codebook_file

        try:
            metadata = check_codebook_file(self.settings.codebooks, hf_config)
        except CodebookMismatch as exc:
            raise KVCompressConfigError(f"{key_name('codebooks')}: {exc}") from None
        m, head_dim = int(metadata["m"]), int(metadata["head_dim"])
        if m % 2 or head_dim % m:
            raise KVCompressConfigError(f"{key_name('codebooks')}: m={m} must be even and divide head_dim {head_dim}")

    def layout(self, head_dim: int, dtype):
        from vllm_kvcompress.methods.lookat.format import LookatFormat

        return LookatFormat.layout_for(self.settings, head_dim, dtype)

    def row_bytes(self, head_dim: int, dtype) -> int:
        return self.layout(head_dim, dtype).row_bytes

    def cache_format(self, hf_config, head_dim, dtype, heads):
        from vllm_kvcompress.methods.lookat.format import LookatFormat

        return LookatFormat.from_settings(self.settings, hf_config, head_dim, dtype, heads)
