"""Greedy generation on a GPU engine with dummy weights, results as JSON (the GPU oracles).

    python -m vllm_kvcompress.harness.gpu_generate SPEC.json OUT.json

SPEC: {"model_config": {HF config.json}, "llm": {LLM kwargs}, "prompts": [[token ids], ...],
       "max_tokens": 32, "codebooks_m": null | m (synthetic LOOKAT codebooks for that config),
       "init_std": null | std (weights re-drawn after start-up: :func:`reinitialise_weights`)}
OUT:  {"outputs": [{"token_ids", "token_logprobs", "top_logprobs"}], "attention_impls", "cudagraph_mode",
       "decode_modes", "kernels",
       "start_s", "kv_cache_tokens", "distinct_tokens"}

No weights reach the GPU machine: ``load_format="dummy"`` (vLLM's seeded initialisation, the
same in every process), no tokenizer (token-id prompts). ``KVCOMPRESS_KERNELS`` in the
environment picks the kernels (``reference`` = the PyTorch ops on the same CUDA tensors).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def synthetic_codebooks(path: Path, config: dict, m: int, seed: int = 0) -> None:
    """A LOOKAT codebook file for ``config`` with seeded normal centroids (no keys to calibrate on)."""
    import types

    import torch
    from safetensors.torch import save_file

    from vllm_kvcompress.methods.artefacts import model_signature
    from vllm_kvcompress.methods.lookat.codebooks import FORMAT

    head_dim = config["hidden_size"] // config["num_attention_heads"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"layer.{i}": torch.randn(config["num_key_value_heads"], m, 256, head_dim // m, generator=generator)
               for i in range(config["num_hidden_layers"])}
    metadata = {"format": FORMAT, "m": str(m), "K": "256", "synthetic": "seeded normal centroids",
                **model_signature(types.SimpleNamespace(**config))}
    save_file(tensors, str(path), metadata=metadata)


def model_folder(config: dict, codebooks_m: int | None = None) -> tuple[Path, Path | None]:
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(config))
    codebooks = None
    if codebooks_m:
        codebooks = folder / f"codebooks-m{codebooks_m}.safetensors"
        synthetic_codebooks(codebooks, config, codebooks_m)
    return folder, codebooks


def reinitialise_weights(worker, std: float) -> int:
    """Every matrix ~ N(0, std) and every vector 1, in place, seeded by the parameter's name
    (the same in every engine on the same GPU). vLLM's dummy weights (uniform +-1e-3) leave
    attention a negligible share of the logits, too weak for an oracle. In place: captured
    CUDA graphs read the same addresses. Returns the number of parameters set."""
    import zlib

    import torch

    from vllm_kvcompress.harness.generate import worker_model

    model = worker_model(worker)
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() < 2:
                param.fill_(1.0)
            else:
                generator = torch.Generator(device=param.device).manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator, device=param.device) * std)
            count += 1
    return count


def engine_facts(llm) -> dict:
    from collections import Counter

    from vllm_kvcompress.harness.generate import attention_impls, decode_modes

    config = llm.llm_engine.vllm_config
    modes = Counter()
    for rank_modes in llm.collective_rpc(decode_modes):
        modes.update(rank_modes)
    return {"attention_impls": sorted({n for names in llm.collective_rpc(attention_impls) for n in names}),
            "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
            "decode_modes": dict(modes),  # decode steps by the graph mode they ran in, all ranks
            "async_scheduling": bool(config.scheduler_config.async_scheduling),
            "kv_cache_tokens": int(config.cache_config.num_gpu_blocks or 0) * int(config.cache_config.block_size)}


def compare_greedy(reference: dict, candidate: dict) -> dict:
    """Two engines' greedy outputs (:func:`run`) on the same prompts, prompt by prompt up to
    the first divergence (after it the contexts differ):

    - ``same``: share of all positions equal before a divergence;
    - ``gap``: the largest logprob difference of the chosen token over those positions;
    - ``ties`` / ``splits``: the divergences that are near ties by
      :class:`~vllm_kvcompress.harness.equivalence.Divergence` (each run prefers its own
      token and the gap between the two moved by at most ``NEAR_TIE_NATS``), and the others,
      each ``(prompt, step, gap moved)``."""
    from vllm_kvcompress.harness.equivalence import first_divergences

    divergences = first_divergences(reference["outputs"], candidate["outputs"])
    stops = {d.prompt: d.step for d in divergences}
    same = total = 0
    gap = 0.0
    for index, (ref, cand) in enumerate(zip(reference["outputs"], candidate["outputs"], strict=True)):
        total += len(ref["token_ids"])
        agreed = stops.get(index, len(ref["token_ids"]))
        same += agreed
        for pos in range(agreed):
            gap = max(gap, abs(ref["token_logprobs"][pos] - cand["token_logprobs"][pos]))
    ties = [(d.prompt, d.step, d.gap_shift) for d in divergences if d.is_near_tie]
    splits = [(d.prompt, d.step, d.gap_shift) for d in divergences if not d.is_near_tie]
    return {"same": same / max(total, 1), "gap": gap, "ties": ties, "splits": splits}


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    folder, codebooks = model_folder(spec["model_config"], spec.get("codebooks_m"))
    kwargs = dict(spec["llm"])
    settings = kwargs.get("additional_config", {}).get("kvcompress")
    if settings is not None and codebooks is not None:
        settings["codebooks"] = str(codebooks)
    started = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, seed=0, **kwargs)
    start_s = time.perf_counter() - started
    if spec.get("init_std"):
        import functools

        llm.collective_rpc(functools.partial(reinitialise_weights, std=float(spec["init_std"])))
    # The top 5 per step: a divergence between two engines can then be told a near tie (the
    # two tokens' logprobs within noise) from a real difference.
    params = SamplingParams(max_tokens=spec.get("max_tokens", 32), temperature=0.0, ignore_eos=True, logprobs=5,
                            detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], params, use_tqdm=False)
    outputs = []
    for result in results:
        completion = result.outputs[0]
        steps = completion.logprobs or []
        logprobs = [step[tok].logprob for tok, step in zip(completion.token_ids, steps)]
        top = [[[t, entry.logprob] for t, entry in step.items()] for step in steps]  # harness.generate's form
        outputs.append({"token_ids": list(completion.token_ids), "token_logprobs": logprobs, "top_logprobs": top})
    return {"outputs": outputs, "kernels": os.environ.get("KVCOMPRESS_KERNELS", "auto"), "start_s": round(start_s, 1),
            "distinct_tokens": len({t for o in outputs for t in o["token_ids"]}), **engine_facts(llm)}


if __name__ == "__main__":
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
