"""On the device: join the GGUF pieces, convert to a bf16 HF folder, check perplexity, time DMS steps.

    python3 prep.py PIECES_DIR BASE_DIR MODEL_OUT DEVICE SEQ
"""
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

pieces, base, model_out, device, seq = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
t0 = time.time()
name = "qwen2.5-coder-0.5b.gguf"
gdir = Path("/tmp/gg")
gdir.mkdir(exist_ok=True)
gpath = gdir / name

if not (model_out / "DONE").exists():
    if not gpath.exists():
        parts = sorted(glob.glob(os.path.join(pieces, "*")))
        print("pieces", [(Path(p).name, os.path.getsize(p)) for p in parts], flush=True)
        h = hashlib.sha256()
        with open(str(gpath) + ".partial", "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        out.write(chunk)
        want = (base / "gguf.sha256").read_text().strip()
        print("sha256", h.hexdigest(), "ok" if h.hexdigest() == want else f"MISMATCH (want {want})", flush=True)
        if h.hexdigest() != want:
            sys.exit(2)
        os.rename(str(gpath) + ".partial", gpath)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    hf = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=name, quantization_config=GgufConfig(dequantize=True),
                                              dtype=torch.bfloat16)
    hf.config.quantization_config = None
    if hasattr(hf, "hf_quantizer"):
        hf.hf_quantizer = None
    tmp = model_out.with_name(model_out.name + ".partial")
    hf.save_pretrained(str(tmp), safe_serialization=True)
    del hf
    saved = json.loads((tmp / "config.json").read_text())
    local = json.loads((base / "tok" / "config.json").read_text())
    print("config keys only in saved:", sorted(set(saved) - set(local)), "only in local:", sorted(set(local) - set(saved)))
    print("config values that differ:", {k: (saved[k], local[k]) for k in set(saved) & set(local) if saved[k] != local[k]})
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / "tok" / f, tmp / f)
    with gzip.open(base / "tok" / "tokenizer.json.gz", "rb") as src, open(tmp / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (tmp / "DONE").write_text("ok\n")
    if model_out.exists():
        shutil.rmtree(model_out)
    tmp.rename(model_out)
    print(f"converted in {time.time() - t0:.1f}s:", sorted(os.listdir(model_out)), flush=True)

import torch

from vllm_kvcompress.offline.dms_train import DMSRetrofit
from vllm_kvcompress.offline.models import load_eager

texts = json.loads(gzip.open(base / "texts-2048.json.gz").read())
tok, model = load_eager(str(model_out))
model.to(device)
ids = torch.tensor([texts[0]], device=device)
with torch.no_grad():
    logits = model(ids).logits.float()
nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
ppl = math.exp(float(nll))
print(f"perplexity on text 0 ({ids.shape[1]} tokens): {ppl:.3f}", flush=True)
del logits
REFERENCE = 29.794  # the local bf16 folder, fp32 eager on CPU, same text: the model itself sits near 30 on these essays
if not (ppl < 30 or abs(ppl - REFERENCE) < 0.5):
    print(f"PERPLEXITY TOO HIGH (local reference {REFERENCE}): not training")
    sys.exit(3)

# Timing: a few DMS steps at the training settings (window 128).
retrofit = DMSRetrofit(model, 128)
retrofit.adapters.to(device)
params = list(retrofit.adapters.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
times = []
for step in range(4):
    t = time.time()
    x = torch.tensor([texts[step][:seq]], device=device)
    try:
        total, kl, per_head, ratio = retrofit.losses(x, step, 50, 2.0)
    except torch.OutOfMemoryError as e:
        print(f"OOM at seq {seq}: {e}", flush=True)
        sys.exit(4)
    opt.zero_grad()
    try:
        total.backward()
    except torch.OutOfMemoryError as e:
        print(f"OOM at seq {seq} (backward): {e}", flush=True)
        sys.exit(4)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    float(kl)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.time() - t)
    print(f"step {step}: {times[-1]:.3f}s kl {float(kl):.5f}", flush=True)
peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
step_time = sum(times[1:]) / len(times[1:])
print(f"seq {seq}: step time {step_time:.3f}s, peak GPU memory {peak:.1f} GiB", flush=True)
Path("/tmp/steptime.json").write_text(json.dumps({"seq": seq, "step_time": step_time, "peak_gib": peak}))
