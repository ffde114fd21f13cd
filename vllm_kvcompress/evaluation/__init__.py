"""Engine-neutral accuracy tasks: prompts as token ids, answers, and scoring.

Nothing here imports vLLM; :mod:`vllm_kvcompress.harness.accuracy` runs the samples.
"""
