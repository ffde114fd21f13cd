"""Eviction on vLLM's CUDA build: its GPU worker with vLLM's V1 model runner and the
plugin's runner mixin (:mod:`vllm_kvcompress.vllm.runner`), as on CPU.

vLLM 0.32 picks its V2 runner on CUDA by default; its block tables have no truncate and
its step order differs (docs/design/eviction-on-cuda.md). Until the plugin's V2
integration lands, start-up selects the V1 runner for eviction methods
(``VLLM_USE_V2_MODEL_RUNNER=0``, logged)."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from vllm_kvcompress.vllm.runner import install_eviction_runner


class KVCompressGPUWorker(Worker):
    """Set as ``worker_cls`` by the plugin when an eviction method runs on CUDA."""

    def init_device(self) -> None:
        super().init_device()
        install_eviction_runner(self)
