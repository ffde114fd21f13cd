"""vllm_kvcompress: KV-cache compression inside vLLM's paged memory.

Turned on with ``--attention-backend kvcompress``; settings come from
``--additional-config '{"kvcompress": {...}}'``. Importing this package is cheap and
touches no device: vLLM calls :func:`vllm_kvcompress.vllm.plugin.register` in each process.
"""

__version__ = "0.1.0"

BACKEND_NAME = "KVCOMPRESS"
BACKEND_PATH = "vllm_kvcompress.vllm.backend.KVCompressBackend"
