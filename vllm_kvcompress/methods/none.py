"""Method ``none``: the full bf16/fp16 cache in the plugin's page layout (pass-through)."""

from __future__ import annotations

from vllm_kvcompress.methods.base import Method


class NoCompression(Method):
    name = "none"
    summary = "stores the full bf16/fp16 cache (pass-through)"
    passthrough = True
