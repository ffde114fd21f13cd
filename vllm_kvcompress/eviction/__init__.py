"""Token eviction, engine-neutral: when to compress (:mod:`schedule`), what to keep
(:mod:`scorers`, :mod:`selection`). Plain tensors in, plain tensors out; the vLLM glue
lives in :mod:`vllm_kvcompress.vllm.scheduler` and :mod:`vllm_kvcompress.vllm.worker`."""
