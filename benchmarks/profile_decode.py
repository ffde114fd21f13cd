import cProfile, pstats, os, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from transformers import AutoTokenizer
    from vllm_kvcompress.offline.models import model_dir
    from vllm_kvcompress.offline.prompts import long_document_ids
    d = str(model_dir("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(d)
    prompts = [{"prompt_token_ids": long_document_ids(tok, 1000, offset=300 * i)} for i in range(8)]
    import sys
    method = sys.argv[1]
    extra = {"kvcompress": {"method": "dms", "dms_adapters": "vllm_kvcompress/artefacts/dms/smollm2-135m/dms-cr8.safetensors"}} if method == "dms" else {"kvcompress": {"method": "none"}}
    llm = LLM(model=d, dtype="bfloat16", max_model_len=2048, enforce_eager=True, attention_backend="kvcompress",
              kv_cache_memory_bytes=256 << 20, additional_config=extra)
    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)
    sp = SamplingParams(max_tokens=48, ignore_eos=True)
    pr = cProfile.Profile()
    t = time.perf_counter(); pr.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    pr.disable(); print(method, "wall", time.perf_counter() - t)
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(18)
