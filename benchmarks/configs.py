"""Named engine configurations. Adding one is one line: a name and the LLM(...) kwargs
it changes. Ad-hoc ones come from the command line as NAME=JSON.

LOOKAT configs are named by pattern, ``lookat-m{M}-v{BITS}[-exact]`` (e.g.
``lookat-m8-v4``): M codes per key, values in BITS (16/8/4), ``-exact`` for
``current_tokens=exact``. Their codebooks are calibrated for the benchmarked model on
first use (``vllm_kvcompress.offline.calibrate.ensure_codebooks``).

Eviction configs: ``{knorm|snapkv|headkv}-r{RATIO}`` (e.g. ``knorm-r0.5``): eviction
removing RATIO of each prompt's tokens (``compression_ratio``; knorm also compacts
whenever decode adds a block past the budget).

KVzap configs: ``kvzap-{linear|mlp}-t{TAU}`` (threshold mode, e.g. ``kvzap-mlp-t-4``) and
``kvzap-{linear|mlp}-r{RATIO}`` (top-k per KV head at the prompt end), with the model's
shipped predictors (``vllm_kvcompress/artefacts/kvzap/MODEL/``).

KVQuant configs: ``kvquant-k{8|4}-v{16|8|4}`` (e.g. ``kvquant-k4-v8``): keys as pre-RoPE
per-channel integers of 8 or 4 bits with the model's shipped ranges
(``vllm_kvcompress/artefacts/key_ranges/MODEL.safetensors``), values in 16/8/4 bits.

DMS configs: ``dms-cr{N}`` (e.g. ``dms-cr4``): the model's shipped DMS adapters trained to
compression N (``vllm_kvcompress/artefacts/dms/MODEL/dms-crN.safetensors``); what they
really remove is measured per request.

Compositions: ``FORMAT+EVICTION`` of two such names, a row format (``kvquant-…`` or
``lookat-…``) and a whole-row eviction (``knorm-…``/``snapkv-…``), e.g.
``kvquant-k8-v8+snapkv-r0.8``: method ``kvquant+snapkv`` with both configs' settings;
``kvquant-…`` rows also under the stream methods (``headkv-…``, ``kvzap-…``, ``dms-cr{N}``),
e.g. ``kvquant-k8-v8+dms-cr8``.

Presets: ``preset-{safe|balanced|max}`` (``{"preset": NAME}``, expanded at start-up).

Budget configs: ``{knorm|snapkv|headkv}-b{TOKENS}`` (e.g. ``headkv-b128``): ``TOKENS``
kept per KV head (``max_kv_tokens``; for HeadKV the average over (layer, KV head)
streams, with the model's shipped R2 head scores), so equal TOKENS = equal total KV.
"""

import re

KVC = "kvcompress"

CONFIGS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "kvcompress-none": {"attention_backend": KVC, "additional_config": {KVC: {"method": "none"}}},
}
BASELINE = "bf16"
LOOKAT_NAME = re.compile(r"lookat-m(\d+)-v(16|8|4)(-exact)?")
EVICTION_NAME = re.compile(r"(knorm|snapkv|headkv)-r(0?\.\d+)")
KVZAP_NAME = re.compile(r"kvzap-(linear|mlp)-(?:t(-?\d+(?:\.\d+)?)|r(0?\.\d+))")
BUDGET_NAME = re.compile(r"(knorm|snapkv|headkv)-b(\d+)")
DMS_NAME = re.compile(r"dms-cr(\d+)")
KVQUANT_NAME = re.compile(r"kvquant-k(8|4)-v(16|8|4)")
NAMES_HELP = (f"{', '.join(sorted(CONFIGS))}, lookat-m{{M}}-v{{16|8|4}}[-exact], {{knorm|snapkv|headkv}}-r{{RATIO}}, "
              "{knorm|snapkv|headkv}-b{TOKENS}, kvzap-{linear|mlp}-{t{TAU}|r{RATIO}}, dms-cr{N}, kvquant-k{8|4}-v{16|8|4}, "
              "FORMAT+EVICTION (e.g. kvquant-k8-v8+snapkv-r0.8, kvquant-k8-v8+dms-cr8) or preset-{safe|balanced|max}")


def _shipped(relative: str, missing: str) -> str:
    """Path of an artefact shipped in the package, or an error saying how to make it."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / relative
    if not path.is_file():
        raise FileNotFoundError(missing.format(path=path))
    return str(path)


def head_scores_file(model: str) -> str:
    return _shipped(f"head_scores/{model}.json", f"no shipped head scores for {model}: run "
                    f"python -m vllm_kvcompress.offline.head_scores --model {model} --out {{path}}")


def kvzap_predictor_file(model: str, kind: str) -> str:
    return _shipped(f"kvzap/{model}/kvzap-{kind}.safetensors", f"no shipped KVzap predictors for {model}: run "
                    f"python -m vllm_kvcompress.offline.kvzap_train --model {model} --out {{path.parent}}")


def dms_adapters_file(model: str, ratio: str) -> str:
    return _shipped(f"dms/{model}/dms-cr{ratio}.safetensors", f"no shipped DMS adapters for {model} at CR {ratio}: "
                    f"run python -m vllm_kvcompress.offline.dms_train --model {model} --max-ratio {ratio} --out DIR and copy "
                    "the last adapters-step*.safetensors to {path}")


def resolve(name: str, model: str) -> dict | None:
    """LLM kwargs of a named config for ``model``; None if the name is unknown."""
    if name in CONFIGS:
        return CONFIGS[name]
    if "+" in name:
        return _composition(name, model)
    if name.startswith("preset-"):  # expanded by the engine's own start-up, as for a user
        return {"attention_backend": KVC, "additional_config": {KVC: {"preset": name[len("preset-"):]}}}
    match = EVICTION_NAME.fullmatch(name)
    if match is not None:
        settings = {"method": match[1], "compression_ratio": float(match[2])}
        if match[1] == "headkv":
            settings["head_scores"] = head_scores_file(model)
        return {"attention_backend": KVC, "additional_config": {KVC: settings}}
    match = KVZAP_NAME.fullmatch(name)
    if match is not None:
        settings = {"method": "kvzap", "kvzap_predictor": kvzap_predictor_file(model, match[1])}
        if match[2] is not None:
            settings["kvzap_threshold"] = float(match[2])
        else:
            settings["compression_ratio"] = float(match[3])
        return {"attention_backend": KVC, "enforce_eager": True, "additional_config": {KVC: settings}}
    match = DMS_NAME.fullmatch(name)
    if match is not None:
        settings = {"method": "dms", "dms_adapters": dms_adapters_file(model, match[1])}
        return {"attention_backend": KVC, "enforce_eager": True, "additional_config": {KVC: settings}}
    match = KVQUANT_NAME.fullmatch(name)
    if match is not None:
        from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

        settings = {"method": "kvquant", "key_ranges": str(ensure_key_ranges(model)), "key_bits": int(match[1]),
                    "value_bits": int(match[2])}
        return {"attention_backend": KVC, "additional_config": {KVC: settings}}
    match = BUDGET_NAME.fullmatch(name)
    if match is not None:
        settings = {"method": match[1], "max_kv_tokens": int(match[2])}
        if match[1] == "headkv":
            settings["head_scores"] = head_scores_file(model)
        return {"attention_backend": KVC, "additional_config": {KVC: settings}}
    match = LOOKAT_NAME.fullmatch(name)
    if match is None:
        return None
    from vllm_kvcompress.offline.calibrate import ensure_codebooks

    settings = {"method": "lookat", "codebooks": str(ensure_codebooks(model, int(match[1]))),
                "value_bits": int(match[2]), "current_tokens": "exact" if match[3] else "coded"}
    return {"attention_backend": KVC, "additional_config": {KVC: settings}}


def _composition(name: str, model: str) -> dict | None:
    fmt, _, evict = name.partition("+")
    whole_rows = (EVICTION_NAME.fullmatch(evict) or BUDGET_NAME.fullmatch(evict)) and not evict.startswith("headkv")
    streams = ((EVICTION_NAME.fullmatch(evict) or BUDGET_NAME.fullmatch(evict)) and evict.startswith("headkv")) or \
        KVZAP_NAME.fullmatch(evict) or DMS_NAME.fullmatch(evict)
    if not (KVQUANT_NAME.fullmatch(fmt) and (whole_rows or streams) or LOOKAT_NAME.fullmatch(fmt) and whole_rows):
        return None
    rows, eviction = resolve(fmt, model), resolve(evict, model)
    rows_settings, eviction_settings = rows["additional_config"][KVC], eviction["additional_config"][KVC]
    settings = {**rows_settings, **eviction_settings,
                "method": f"{rows_settings['method']}+{eviction_settings['method']}"}
    return {**rows, **eviction, "additional_config": {KVC: settings}}


def evicted_fraction(llm_kwargs: dict) -> float:
    """Share of context tokens an eviction config drops (its declared compression_ratio)."""
    settings = (llm_kwargs.get("additional_config") or {}).get(KVC) or {}
    if "preset" in settings:  # prompts past the preset's min_kv_tokens (all the frontier's 3K and 4K cells)
        from vllm_kvcompress.presets import PRESETS

        settings = PRESETS[settings["preset"]]
    return float(settings.get("compression_ratio") or 0.0)
