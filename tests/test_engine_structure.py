"""The engine's seams: stepping interface, plan handed down (never made twice), backend registry,
errors mapped to exit codes, policies that do not mutate a loaded engine."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy, nested_prompts, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.config import EngineConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.errors import ConfigError, JobError
from prefixbatch.execution.attention import triton_backend
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.registry import BackendUnavailableError, select_backend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.kv_cache import KVCache
from prefixbatch.outputs import Request
from prefixbatch.planning import plan as plan_module
from prefixbatch.planning.plan import computed_tokens, make_plan
from prefixbatch.scheduling.request_source import CompactRequests


def _config(path, **kw) -> EngineConfig:  # type: ignore[no-untyped-def]
    return EngineConfig(
        model=str(path), device="cpu", block_size=8, kv_cache_memory=16 * 2**20, **kw
    )


def test_engine_runs_a_batch_step_by_step(tiny_models):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(12, seed=5)
    max_tokens = [3 + i % 5 for i in range(len(prompts))]
    engine = LLMEngine(_config(tiny_models["llama"]))
    engine.add_requests(
        [
            Request(i, p, SamplingParams(max_tokens=m, temperature=0))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))
        ]
    )
    got: dict[int, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.index not in got  # each request finishes once
            got[out.index] = out.output_token_ids
        steps += 1
        engine.scheduler.check_integrity()
    assert steps == engine.stats.steps > 1
    assert [got[i] for i in range(len(prompts))] == hf_greedy(
        tiny_models["llama"], prompts, max_tokens
    )
    assert engine.blocks.num_used == 0  # every block went back


def test_abort_frees_the_request_and_leaves_the_rest_intact(tiny_models):  # type: ignore[no-untyped-def]
    rng = random.Random(2)
    prompts = nested_prompts(rng, system=16, doc=16, docs=2, per_doc=3, vocab=(3, 500))
    engine = LLMEngine(_config(tiny_models["qwen2"]))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_requests([Request(i, p, params) for i, p in enumerate(prompts)])
    engine.step()  # the prefixes start
    assert engine.abort(0) and engine.abort(4)
    assert not engine.abort(0)  # already gone
    assert not engine.abort(99)  # never added
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        engine.scheduler.check_integrity()
    assert sorted(o.index for o in outs) == [1, 2, 3, 5]
    expected = hf_greedy(tiny_models["qwen2"], [prompts[i] for i in (1, 2, 3, 5)], [6] * 4)
    assert [o.output_token_ids for o in sorted(outs, key=lambda o: o.index)] == expected
    assert engine.blocks.num_used == 0


def test_aborting_every_member_drops_the_prefix_leader(tiny_models):  # type: ignore[no-untyped-def]
    prompts = [[7] * 24 + [i + 10] for i in range(4)]
    engine = LLMEngine(_config(tiny_models["llama"]))
    engine.add_requests(
        [Request(i, p, SamplingParams(max_tokens=4, temperature=0)) for i, p in enumerate(prompts)]
    )
    assert engine.stats.groups == 1
    for i in range(4):
        assert engine.abort(i)
    assert not engine.has_unfinished()  # the leader went with its last member
    assert engine.blocks.num_used == 0


def test_duplicate_request_ids_are_refused(tiny_models):  # type: ignore[no-untyped-def]
    engine = LLMEngine(_config(tiny_models["llama"]))
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.add_request(Request(1, [5, 6, 7], params))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request(Request(1, [5, 6, 8], params))


def test_engine_consumes_the_callers_plan(tiny_models, monkeypatch):  # type: ignore[no-untyped-def]
    """The API plans once; the engine (and so a Ray worker handed a plan) never plans."""
    prompts = shared_prefix_prompts(10, seed=4)
    llm = LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    calls = []
    real = plan_module.make_plan

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("prefixbatch.llm.make_plan", counting)
    monkeypatch.setattr("prefixbatch.engine.make_plan", counting)
    llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert len(calls) == 1


def test_ray_worker_runs_its_share_of_the_drivers_plan(tiny_models, monkeypatch):  # type: ignore[no-untyped-def]
    from prefixbatch.distributed.ray_executor import EngineWorker

    prompts = shared_prefix_prompts(16, seed=6)
    requests = [
        Request(i, p, SamplingParams(max_tokens=4, temperature=0)) for i, p in enumerate(prompts)
    ]
    plan = make_plan(prompts, [4] * len(prompts), 8)
    share = [i for i in range(len(prompts)) if i % 2 == 0]
    worker = EngineWorker(_config(tiny_models["llama"]), threads=None)

    def no_planning(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a worker planned")

    monkeypatch.setattr("prefixbatch.engine.make_plan", no_planning)
    chunk = [
        Request(j, requests[i].prompt_token_ids, requests[i].params) for j, i in enumerate(share)
    ]
    batches = list(worker.generate(CompactRequests.of(chunk), plan.subset(share)))
    outs, stats = [o for b, _ in batches for o in b], batches[-1][1]
    expected = hf_greedy(tiny_models["llama"], [prompts[i] for i in share], [4] * len(share))
    assert [o.output_token_ids for o in sorted(outs, key=lambda o: o.index)] == expected
    assert stats.groups > 0


def test_plan_subset_keeps_groups_and_renumbers():  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    prompts = nested_prompts(rng, system=32, doc=32, docs=3, per_doc=4, vocab=(3, 500))
    plan = make_plan(prompts, [5] * len(prompts), 16)
    share = [1, 2, 5, 8, 9, 10, 11]  # two of doc 0, one of doc 1, all of doc 2
    sub = plan.subset(share)
    assert sorted(sub.root.requests().tolist()) == list(range(len(share)))
    assert sub.lengths.tolist() == [len(prompts[i]) for i in share]
    # Same as planning the share from scratch.
    fresh = make_plan([prompts[i] for i in share], [5] * len(share), 16)
    assert sub.computed_prefill_tokens == fresh.computed_prefill_tokens
    assert sub.computed_prefill_tokens == computed_tokens(sub.root)
    lone = sub.root.children[0]
    assert lone.prefix_len == 32  # the system prompt level
    assert len(lone.children) == 2  # doc 0 (two questions) and doc 2; doc 1's lone question joins
    assert len(lone.members) == 1


def test_registry_picks_the_backend_by_device_and_dtype():  # type: ignore[no-untyped-def]
    cpu = torch.device("cpu")
    fp32 = KVCache(1, 4, 16, 2, 16, torch.float32, cpu)
    fp16 = KVCache(1, 4, 16, 2, 16, torch.float16, cpu)
    assert isinstance(select_backend("auto", fp32, 4, 0.25), CpuBackend)
    assert type(select_backend("auto", fp16, 4, 0.25)) is SharedPrefixBackend
    assert type(select_backend("torch", fp32, 4, 0.25)) is SharedPrefixBackend
    with pytest.raises(BackendUnavailableError, match="cannot run.*the CPU in float32 only"):
        select_backend("cpu", fp16, 4, 0.25)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        select_backend("flash", fp32, 4, 0.25)
    with pytest.MonkeyPatch.context() as m:  # say why a backend cannot run: no Triton here
        m.setattr(triton_backend, "triton_available", lambda device: False)
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            select_backend("triton", fp32, 4, 0.25)


def test_shared_prefix_threshold_is_the_backends_unless_configured(tiny_models):  # type: ignore[no-untyped-def]
    """The CPU kernels read shared prefixes of 128 tokens as levels, the PyTorch cascade of 256;
    a configured threshold overrides both."""
    path = str(tiny_models["llama"])
    opts = {"device": "cpu", "block_size": 8, "kv_cache_memory": 8 * 2**20}
    assert LLM(path, **opts).engine.runner.min_shared == 128
    assert LLM(path, kernels="torch", **opts).engine.runner.min_shared == 256
    assert LLM(path, cascade_min_prefix=64, **opts).engine.runner.min_shared == 64


def test_with_policy_leaves_the_original_untouched(tiny_models):  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    lru = llm.with_policy("fcfs-lru")
    assert llm.engine.config.policy == "batchllm"
    assert lru.engine.config.policy == "fcfs-lru"
    assert lru.engine.loaded is llm.engine.loaded  # the model is loaded once
    prompts = shared_prefix_prompts(6, seed=9)
    params = SamplingParams(max_tokens=4, temperature=0)
    a = [o.output_token_ids for o in llm.generate(prompts, params)]
    b = [o.output_token_ids for o in lru.generate(prompts, params)]
    assert a == b


def test_bad_options_are_config_errors():  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="unknown policy"):
        EngineConfig(policy="lifo")
    assert issubclass(ConfigError, JobError) and issubclass(ConfigError, ValueError)


def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(tmp_path, capsys):  # type: ignore[no-untyped-def]
    from prefixbatch.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    code = main(["run", str(inp), "-o", str(tmp_path / "out.jsonl"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "CUDA is not available" in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Only whole-job errors become exit 2; an internal error is not disguised as bad input."""
    from prefixbatch import cli

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("an internal bug")

    monkeypatch.setattr("prefixbatch.jobs.job.run_job", broken)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["run", str(inp), "-o", str(tmp_path / "out.jsonl"), "--device", "cpu"])
