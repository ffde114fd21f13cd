"""Attention ops for vllm_kvcompress, installed as ``vllm_kvcompress.kernels``.

Each op has a PyTorch reference (``*_ref`` modules, runs anywhere) and, where a
GPU kernel exists, a Triton version tested against that reference. Nothing here
knows about vLLM: inputs are plain tensors (cache pages, block tables, lengths).
The engine calls them through :mod:`ops`, which picks the implementation per call.
"""
