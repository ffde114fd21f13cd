"""Engine side of tests/test_forcing.py: forced decode vs prompt_logprobs, one engine."""

from vllm_kvcompress.harness.accuracy import sampling_params


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.harness.forcing import ForcedContinuation

    llm = LLM(**spec["llm"], logits_processors=[ForcedContinuation])
    context, forced = spec["context"], spec["forced"]
    out = llm.generate([{"prompt_token_ids": context}], sampling_params({"forced_ids": forced}), use_tqdm=False)[0].outputs[0]
    full = llm.generate([{"prompt_token_ids": context + forced}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)[0]
    greedy = llm.generate([{"prompt_token_ids": context}], SamplingParams(max_tokens=len(forced), temperature=0.0,
                          ignore_eos=True), use_tqdm=False)[0].outputs[0]
    return {
        "emitted": list(out.token_ids),
        "forced_logprobs": [step[t].logprob for t, step in zip(out.token_ids, out.logprobs)],
        "prompt_logprobs": [full.prompt_logprobs[len(context) + i][t].logprob for i, t in enumerate(forced)],
        "greedy": list(greedy.token_ids),
    }


if __name__ == "__main__":
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
