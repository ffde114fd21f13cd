"""Token eviction machinery the eviction methods share, engine-neutral: when to compress
(:mod:`schedule`, :mod:`streams`, :mod:`threshold`), what to keep (:mod:`scorers`,
:mod:`selection`). Plain tensors in, plain tensors out; the methods
(:mod:`vllm_kvcompress.methods`) build on it, the vLLM glue (:mod:`vllm_kvcompress.vllm`)
runs it."""
