"""Eviction on vLLM's CPU build: its CPU worker, with the plugin's runner mixin
(:mod:`vllm_kvcompress.vllm.runner`)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvcompress.vllm.runner import install_eviction_runner


class KVCompressCPUWorker(CPUWorker):
    """Set as ``worker_cls`` by the plugin when an eviction method is configured (CPU)."""

    def init_device(self) -> None:
        super().init_device()
        install_eviction_runner(self)
