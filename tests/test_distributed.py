"""Scale-out: sharding keeps groups whole and balances them; a local Ray cluster of two engine
workers gives the single-process output, and survives a worker killed mid-job."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from conftest import nested_prompts, shared_prefix_prompts
from prefixbatch.config import EngineConfig
from prefixbatch.distributed.sharding import Unit, lpt_assign, make_chunks, plan_units
from prefixbatch.outputs import Request
from prefixbatch.planning.plan import make_plan
from prefixbatch.sampling_params import SamplingParams


def skewed_plan(seed: int = 0):  # type: ignore[no-untyped-def]
    """A few huge groups, many mid-sized ones and a long tail of singles."""
    rng = random.Random(seed)
    prompts = []
    for size, count, length in ((64, 3, 400), (8, 40, 120), (1, 300, 60)):
        for _ in range(count):
            head = [rng.randrange(1, 1000) for _ in range(length)]
            prompts += [
                head + [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 30))]
                for _ in range(size)
            ]
    rng.shuffle(prompts)
    return make_plan(prompts, [rng.choice([16, 64, 256]) for _ in prompts], 16)


def test_units_never_split_a_group_and_cover_every_request():
    plan = skewed_plan()
    units = plan_units(plan, workers=8)
    seen = [r for u in units for r in u.requests]
    assert sorted(seen) == list(range(len(plan.lengths)))
    for g in plan.root.children:
        owners = {i for i, u in enumerate(units) if set(g.requests()) & set(u.requests)}
        assert len(owners) == 1


@pytest.mark.parametrize("workers", [1, 2, 4, 8, 64])
def test_lpt_balance_bound(workers):  # type: ignore[no-untyped-def]
    units = plan_units(skewed_plan(workers), workers)
    costs = [u.cost for u in units]
    loads = [sum(costs[i] for i in part) for part in lpt_assign(costs, workers)]
    assert sorted(i for part in lpt_assign(costs, workers) for i in part) == list(range(len(units)))
    mean = sum(costs) / workers
    assert max(loads) <= mean + max(costs)  # the stated bound
    if workers <= 8:
        assert max(loads) / mean < 1.05  # with many small units LPT is nearly perfect


def test_a_group_above_everything_is_split_into_whole_subgroups():
    prompts = nested_prompts(
        random.Random(3), system=64, doc=96, docs=12, per_doc=4, vocab=(1, 1000)
    )
    plan = make_plan(prompts, [32] * len(prompts), 16)
    assert len(plan.root.children) == 1  # one level above every request
    assert len(plan_units(plan, workers=1)) == 1
    units = plan_units(plan, workers=4)
    (top,) = plan.root.children
    assert len(units) == 12  # one per document group
    for doc in top.children:
        assert sum(1 for u in units if set(doc.requests()) & set(u.requests)) == 1
    costs = [u.cost for u in units]
    loads = [sum(costs[i] for i in part) for part in lpt_assign(costs, 4)]
    assert max(loads) / (sum(costs) / 4) < 1.01


def test_chunks_are_largest_first_and_complete():
    units = [Unit((i,), c) for i, c in enumerate([50, 1, 1, 30, 2, 2, 2, 9])]
    chunks = make_chunks(units, workers=2, per_worker=2)
    assert [u.cost for u in chunks[0]] == [50]
    assert sorted(u.requests[0] for c in chunks for u in c) == list(range(8))


def test_workers_without_ray_explain_what_to_install(tmp_path, tiny_models, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    import sys

    from prefixbatch.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a", "prompt": "w5 w6"}\n')
    code = main(
        [
            "run",
            str(inp),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--model",
            str(tiny_models["llama"]),
            "--workers",
            "2",
            "--quiet",
        ]
    )
    assert code == 2
    assert "pip install 'prefixbatch[ray]'" in capsys.readouterr().err


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _requests(n: int) -> list[Request]:
    prompts = shared_prefix_prompts(n, seed=11, prefixes=5)
    return [
        Request(i, p, SamplingParams(max_tokens=8 + i % 5, temperature=0))
        for i, p in enumerate(prompts)
    ]


def test_two_workers_match_single_process(ray_cluster, tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch.distributed.ray_executor import RayExecutor
    from prefixbatch.engine import LLMEngine

    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
    )
    requests = _requests(48)
    single = {o.index: o.output_token_ids for o in LLMEngine(config).generate(requests)}
    executor = RayExecutor(config, workers=2)
    try:
        outs = list(executor.generate(requests))
        assert {o.index: o.output_token_ids for o in outs} == single
        assert len(outs) == len(requests)
        assert len(executor.assignments) == 2  # both workers took chunks
        owner = {i: w for w, units in executor.assignments.items() for u in units for i in u}
        plan = make_plan(
            [r.prompt_token_ids for r in requests], [r.params.max_tokens for r in requests], 8
        )
        for g in plan.root.children:  # no group straddles two workers
            assert len({owner[i] for i in g.requests()}) == 1
        assert executor.stats.requests == len(requests)
        done = [executor.done.get(w, 0) for w in range(2)]  # the progress note: counts, not x/y
        lag = max(done) - min(done)
        assert executor.status() == (
            f"2 workers, chunks done per worker: {done[0]}, {done[1]} (lag {lag})"
        )
    finally:
        executor.shutdown()


def test_killed_worker_loses_nothing(ray_cluster, tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch.distributed.ray_executor import RayExecutor

    config = EngineConfig(
        model=str(tiny_models["qwen2"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
    )
    requests = _requests(60)
    executor = RayExecutor(config, workers=2, chunks_per_worker=6)
    try:
        outputs = []
        stream = executor.generate(requests)
        outputs.append(next(stream))
        ray.kill(executor.actors[0])  # dies mid-job: busy or between chunks
        outputs += list(stream)
        indices = [o.index for o in outputs]
        assert sorted(indices) == list(range(len(requests)))  # none missing, none twice
        assert executor.failed_workers == [0]
    finally:
        executor.shutdown()


def test_cli_with_workers_and_resume(ray_cluster, tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    import json

    from prefixbatch.cli import main

    lines = [
        {
            "custom_id": f"r{i}",
            "prompt": " ".join(f"w{(i % 3) * 50 + j + 3}" for j in range(40)) + f" w{i + 200}",
            "max_tokens": 6,
            "temperature": 0,
        }
        for i in range(30)
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = str(tiny_models["llama"])
    base = ["run", str(inp), "--model", model, "--quiet", "--block-size", "8", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "single.jsonl")]) == 0
    out = tmp_path / "multi.jsonl"
    assert main([*base, "-o", str(out), "--workers", "2"]) == 0
    head = out.read_text().splitlines()[:10]
    out.write_text("\n".join(head) + "\n")  # as if the driver had died after 10 answers
    assert main([*base, "-o", str(out), "--workers", "2", "--resume"]) == 0

    def texts(p):  # type: ignore[no-untyped-def]
        return {
            r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
            for r in map(json.loads, p.read_text().splitlines())
        }

    assert len(out.read_text().splitlines()) == 30
    assert texts(out) == texts(tmp_path / "single.jsonl")


def test_two_workers_carry_n_and_logprobs(ray_cluster, tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch.distributed.ray_executor import RayExecutor
    from prefixbatch.engine import LLMEngine

    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
    )
    requests = [
        Request(r.index, r.prompt_token_ids, replace(r.params, temperature=0.9, seed=r.index))
        for r in _requests(16)
    ]
    for i in range(0, 16, 3):  # n=2 with logprobs beside plain requests
        r = requests[i]
        requests[i] = Request(i, r.prompt_token_ids, replace(r.params, n=2, logprobs=2))

    def by_index(outs):  # type: ignore[no-untyped-def]
        return {
            o.index: [
                (c.token_ids, c.logprobs and [e.token_id for e in c.logprobs]) for c in o.outputs
            ]
            for o in outs
        }

    single = by_index(LLMEngine(config).generate(requests))
    executor = RayExecutor(config, workers=2)
    try:
        outs = list(executor.generate(requests))
        assert by_index(outs) == single
        assert all(len(o.outputs) == 2 and o.outputs[1].logprobs for o in outs if o.index % 3 == 0)
    finally:
        executor.shutdown()


def test_two_workers_carry_tool_calls(ray_cluster, tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    """Forced tool calls on Ray: the driver renders and parses, the grammar travels in the
    params; the records equal a single process's."""
    import json

    from chat_formats import chat_model
    from test_tools_job import ENGINE, LINES, records

    from prefixbatch.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES[:4]))
    model = chat_model(tiny_models["qwen3"], "qwen3", tmp_path / "model")
    base = ["run", str(inp), "--model", str(model), *ENGINE]
    assert main([*base, "-o", str(tmp_path / "single.jsonl")]) == 0
    assert main([*base, "-o", str(tmp_path / "ray.jsonl"), "--workers", "2"]) == 0

    def choices(path):  # type: ignore[no-untyped-def]
        return {c: r["response"]["body"]["choices"] for c, r in records(path).items()}

    ray_choices = choices(tmp_path / "ray.jsonl")
    assert ray_choices == choices(tmp_path / "single.jsonl")
    assert all("tool_calls" in ray_choices[c][0]["message"] for c in ("named", "single"))


def test_two_workers_carry_responses(ray_cluster, tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    """/v1/responses lines on Ray: the driver maps, renders and writes Response objects; the
    records equal a single process's."""
    import json

    from chat_formats import chat_model
    from test_responses import ENGINE, LINES, records, stable

    from prefixbatch.cli import main

    inp = tmp_path / "in.jsonl"
    lines = [x for x in LINES if x["url"] == "/v1/responses"]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = chat_model(tiny_models["qwen3"], "qwen3", tmp_path / "model")
    base = ["run", str(inp), "--model", str(model), *ENGINE]
    assert main([*base, "-o", str(tmp_path / "single.jsonl")]) == 0
    assert main([*base, "-o", str(tmp_path / "ray.jsonl"), "--workers", "2"]) == 0
    single, ray_recs = (records((tmp_path / f).read_text()) for f in ("single.jsonl", "ray.jsonl"))
    assert {c: stable(r) for c, r in ray_recs.items()} == {c: stable(r) for c, r in single.items()}
    assert any(
        i["type"] == "function_call" for i in ray_recs["tools"]["response"]["body"]["output"]
    )


def test_two_workers_embed(ray_cluster, tiny_models):  # type: ignore[no-untyped-def]
    """Embedding requests on Ray: each equals transformers' pooled last hidden state."""
    from test_embeddings import TOLERANCE, hf_embeddings

    from prefixbatch.distributed.ray_executor import RayExecutor
    from prefixbatch.pooling import EmbeddingParams

    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
    )
    prompts = shared_prefix_prompts(20, seed=5, prefixes=3)
    params = SamplingParams(max_tokens=1, embedding=EmbeddingParams())
    expected = hf_embeddings(tiny_models["llama"], prompts, "last")
    executor = RayExecutor(config, workers=2)
    try:
        outs = list(executor.generate([Request(i, p, params) for i, p in enumerate(prompts)]))
        assert len(executor.assignments) == 2 and len(outs) == len(prompts)
        for o in outs:
            assert o.embedding is not None
            assert np.abs(o.embedding - expected[o.index]).max() <= TOLERANCE
    finally:
        executor.shutdown()


def test_two_workers_score_with_score_tokens(ray_cluster, tiny_models):  # type: ignore[no-untyped-def]
    """Score requests on Ray: the engine option naming a reranker's score tokens reaches the
    workers, and each score is the softmax of transformers' last-position logits."""
    from test_scoring import DOCS, ENGINE, FALSE, QUERY, TOLERANCE, TRUE, hf_token_scores, pair_ids

    from prefixbatch.distributed.ray_executor import RayExecutor
    from prefixbatch.pooling import EmbeddingParams
    from prefixbatch.scoring import ScoreParams

    model = tiny_models["llama"]
    config = EngineConfig(model=str(model), score_tokens=(FALSE, TRUE), **ENGINE)
    prompts = pair_ids(model, [(QUERY, d) for d in DOCS] + [(DOCS[0], d) for d in DOCS])
    params = SamplingParams(max_tokens=1, embedding=EmbeddingParams(), score=ScoreParams())
    expected = hf_token_scores(model, prompts, 10, 11)
    executor = RayExecutor(config, workers=2)
    try:
        outs = list(executor.generate([Request(i, p, params) for i, p in enumerate(prompts)]))
        assert len(executor.assignments) == 2 and len(outs) == len(prompts)
        assert all(abs(o.score - expected[o.index]) <= TOLERANCE for o in outs)
    finally:
        executor.shutdown()
