"""Named engine configurations. Adding one is one line: a name and the LLM(...) kwargs
it changes. Ad-hoc ones come from the command line as NAME=JSON."""

KVC = "kvcompress"

CONFIGS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "kvcompress-none": {"attention_backend": KVC, "additional_config": {KVC: {"method": "none"}}},
}
BASELINE = "bf16"


def evicted_fraction(llm_kwargs: dict) -> float:
    """Share of context tokens an eviction config drops (its declared compression_ratio)."""
    settings = (llm_kwargs.get("additional_config") or {}).get(KVC) or {}
    return float(settings.get("compression_ratio") or 0.0)
