"""One request's fault is one request's error, through the engine: a component monkeypatched to
raise for one chosen request, at each per-request stage of a step, ends that request with an
error (no traceback) and frees its blocks; every other request answers as it does without the
fault; the engine is idle and consistent afterwards. A fault that is not one request's (memory,
the forward pass) stops the batch and still leaves the engine idle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.detokenizer import OutputText
from prefixbatch.execution import step_sampler
from prefixbatch.execution.penalties import LogitsProcessing
from prefixbatch.execution.row_faults import Faults
from prefixbatch.execution.sampler import SamplingTensors, torch_argmax
from prefixbatch.execution.step_sampler import NO_TOKEN, StepSampler
from prefixbatch.execution.structured import StructuredOutput
from prefixbatch.grammar_spec import GrammarSpec
from prefixbatch.outputs import RequestOutput

CHOSEN = 3  # the request the injected faults pick
REGEX = GrammarSpec.from_request(guided_regex="w1[0-9]")  # one word of the tiny vocabulary
CHOSEN_REGEX = GrammarSpec.from_request(guided_regex="w2[0-9]")


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)


def batch(chosen: SamplingParams) -> tuple[list[list[int]], list[SamplingParams]]:
    """Eight prompts with shared prefixes, each using other features; ``chosen`` is request 3's."""
    prompts = shared_prefix_prompts(8, seed=4, prefix_len=24)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    params = [
        greedy,
        SamplingParams(max_tokens=6, temperature=0.8, seed=5, n=2),
        replace(greedy, structured=REGEX),
        chosen,
        replace(greedy, logprobs=2, prompt_logprobs=1),
        replace(greedy, presence_penalty=0.5, repetition_penalty=1.2),
        replace(greedy, stop=("w100",), max_tokens=5),
        replace(greedy, min_tokens=2, ignore_eos=True, max_tokens=4),
    ]
    return prompts, params


def raise_if(condition: Callable[..., bool], original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` that raises ``RuntimeError("injected fault")`` when ``condition`` holds for
    its arguments."""

    def injected(*args: Any, **kwargs: Any) -> Any:
        if condition(*args, **kwargs):
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return injected


def chosen_matchers(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Ids of the grammar matchers made for the chosen request's grammar."""
    made: set[int] = set()
    original = StructuredOutput.matcher

    def matcher(self: StructuredOutput, spec: GrammarSpec) -> Any:
        m = original(self, spec)
        if spec == CHOSEN_REGEX:
            made.add(id(m))
        return m

    monkeypatch.setattr(StructuredOutput, "matcher", matcher)
    return made


def inject_matcher(mp: pytest.MonkeyPatch) -> None:
    marked = lambda self, spec: spec == CHOSEN_REGEX  # noqa: E731
    mp.setattr(StructuredOutput, "matcher", raise_if(marked, StructuredOutput.matcher))


def inject_fill(mp: pytest.MonkeyPatch) -> None:
    made = chosen_matchers(mp)
    has_chosen = lambda s, ms, *a: any(id(m) in made for m in ms)  # noqa: E731
    mp.setattr(StructuredOutput, "fill", raise_if(has_chosen, StructuredOutput.fill))


def inject_accept(mp: pytest.MonkeyPatch) -> None:
    made = chosen_matchers(mp)
    has_chosen = lambda s, ms, *a: any(id(m) in made for m in ms)  # noqa: E731
    mp.setattr(StructuredOutput, "accept", raise_if(has_chosen, StructuredOutput.accept))


def inject_penalties(mp: pytest.MonkeyPatch) -> None:
    """At staging, on the host (``prepare``)."""
    marked = lambda cls, seqs, state, eos, rows: any(  # noqa: E731
        seqs[i].params.presence_penalty == 0.25 for i in rows
    )
    stage = LogitsProcessing.stage.__func__  # type: ignore[attr-defined]
    mp.setattr(LogitsProcessing, "stage", classmethod(raise_if(marked, stage)))


def inject_penalties_apply(mp: pytest.MonkeyPatch) -> None:
    """On the device (``sample_async``): rerun row by row, each row staged alone."""

    def marked(self: LogitsProcessing, logits: torch.Tensor) -> bool:
        return self.presence is not None and bool((self.presence == 0.25).any())

    mp.setattr(LogitsProcessing, "apply", raise_if(marked, LogitsProcessing.apply))


def inject_sampling(mp: pytest.MonkeyPatch) -> None:
    """At staging, on the host."""
    marked = lambda cls, rows, params, seeds, index: 13 in seeds  # noqa: E731
    stage = SamplingTensors.stage.__func__  # type: ignore[attr-defined]
    mp.setattr(SamplingTensors, "stage", classmethod(raise_if(marked, stage)))


def inject_sampling_device(mp: pytest.MonkeyPatch) -> None:
    """On the device: the draw of a row sampled at temperature 0.91."""

    def marked(logits: torch.Tensor, tensors: SamplingTensors | None, *args: Any) -> bool:
        return tensors is not None and bool(
            torch.isclose(tensors.temperature, torch.tensor(0.91)).any()
        )

    mp.setattr(step_sampler, "sample", raise_if(marked, step_sampler.sample))


def inject_logprobs(mp: pytest.MonkeyPatch) -> None:
    marked = lambda logits, ids, k: k == 7  # noqa: E731
    mp.setattr(step_sampler, "compute_logprobs", raise_if(marked, step_sampler.compute_logprobs))


def inject_prompt_logprobs(mp: pytest.MonkeyPatch) -> None:
    marked = lambda logits, prompt, start, k: k == 4  # noqa: E731
    mp.setattr(step_sampler, "prompt_logprobs", raise_if(marked, step_sampler.prompt_logprobs))


def inject_detokenizer(mp: pytest.MonkeyPatch) -> None:
    marked = lambda self, token, stop_token: self.params.max_tokens == 7  # noqa: E731
    mp.setattr(OutputText, "append", raise_if(marked, OutputText.append))


def inject_stop_strings(mp: pytest.MonkeyPatch) -> None:
    from prefixbatch import detokenizer

    marked = lambda text, new, stop, include: "w498" in stop  # noqa: E731
    mp.setattr(detokenizer, "find_stop_string", raise_if(marked, detokenizer.find_stop_string))


def inject_output(mp: pytest.MonkeyPatch) -> None:
    marked = lambda self, seq: seq.params.logprobs == 6  # noqa: E731
    mp.setattr(StepSampler, "logprobs", raise_if(marked, StepSampler.logprobs))


greedy = SamplingParams(max_tokens=6, temperature=0)
STAGES = [  # (stage named in the error, the chosen request's params, the injection)
    ("grammar", replace(greedy, structured=CHOSEN_REGEX), inject_matcher),
    ("grammar mask", replace(greedy, structured=CHOSEN_REGEX), inject_fill),
    ("grammar", replace(greedy, structured=CHOSEN_REGEX), inject_accept),
    ("penalties", replace(greedy, presence_penalty=0.25), inject_penalties),
    ("penalties", replace(greedy, presence_penalty=0.25), inject_penalties_apply),
    ("sampling", SamplingParams(max_tokens=6, temperature=0.9, seed=13, n=2), inject_sampling),
    (
        "sampling",
        SamplingParams(max_tokens=6, temperature=0.91, seed=2, n=2),
        inject_sampling_device,
    ),
    ("logprobs", replace(greedy, logprobs=7), inject_logprobs),
    ("prompt logprobs", replace(greedy, prompt_logprobs=4), inject_prompt_logprobs),
    ("detokenizing", replace(greedy, max_tokens=7), inject_detokenizer),
    ("detokenizing", replace(greedy, stop=("w498",)), inject_stop_strings),
    ("output", replace(greedy, logprobs=6), inject_output),
]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    engine.scheduler.check_integrity()
    assert engine.blocks.num_available == engine.blocks.num_blocks
    assert not engine._requests and not engine._sequences and not engine._finished


def same_answer(a: RequestOutput, b: RequestOutput) -> bool:
    return a.error is None and [(c.token_ids, c.text) for c in a.outputs] == [
        (c.token_ids, c.text) for c in b.outputs
    ]


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-lru"])
@pytest.mark.parametrize(("stage", "chosen", "inject"), STAGES)
def test_a_fault_at_one_stage_fails_only_its_request(  # type: ignore[no-untyped-def]
    llm, monkeypatch, policy, stage, chosen, inject
):
    engine = llm.with_policy(policy)
    prompts, params = batch(chosen)
    clean = engine.generate(prompts, params)
    assert all(o.error is None for o in clean)
    inject(monkeypatch)
    outs = engine.generate(prompts, params)
    failed = outs[CHOSEN]
    assert failed.error is not None and failed.error.startswith(f"{stage}: RuntimeError")
    assert failed.error.endswith("injected fault") and "Traceback" not in failed.error
    assert failed.outputs == [] and failed.finish_reason == "error" and failed.text == ""
    for i, (out, ref) in enumerate(zip(outs, clean)):
        if i != CHOSEN:
            assert same_answer(out, ref), f"request {i} changed"
    assert_idle(engine)


def test_a_grammar_the_vocabulary_cannot_spell_is_an_error_not_token_0(llm):  # type: ignore[no-untyped-def]
    # The tiny word-level vocabulary has no space token: "w7 w9" cannot be produced, so the
    # first step masks every token. Before, token 0 was emitted for it.
    prompts, params = batch(SamplingParams(max_tokens=6, temperature=0))
    unspellable = GrammarSpec.from_request(guided_choice=["w7 w9"])
    params[CHOSEN] = replace(params[CHOSEN], structured=unspellable)
    outs = llm.generate(prompts, params)
    assert outs[CHOSEN].error == NO_TOKEN
    assert all(o.error is None for i, o in enumerate(outs) if i != CHOSEN)
    assert_idle(llm)


def test_no_all_minus_inf_row_is_sampled():  # type: ignore[no-untyped-def]
    # Rows 1 and 2 are masked (min_tokens holds EOS back), and every logit there is -inf.
    params = [
        SamplingParams(temperature=t, seed=1, min_tokens=m)
        for t, m in zip((0, 0.7, 0, 1.0), (0, 2, 2, 0))
    ]
    seqs = [step_sampler_seq(p) for p in params]
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    logits[1] = float("-inf")
    logits[2] = float("-inf")
    expected = logits[[0, 3]].clone()
    sampler = StepSampler(32, (2,), lambda: pytest.fail("no grammar"))  # type: ignore[arg-type,return-value]
    plan = sampler.prepare(seqs)
    tokens = sampler.sample(logits, plan)
    assert tokens[1] == tokens[2] == -1 and plan.faults.errors == {1: NO_TOKEN, 2: NO_TOKEN}
    assert tokens[0] == int(expected[0].argmax()) and 0 <= tokens[3] < 32


def test_a_greedy_head_fault_fails_only_its_row():  # type: ignore[no-untyped-def]
    """The fused greedy head (hidden states -> tokens) raising for one row: the batch call
    fails, the rows run one by one, and only the marked row gets -1 and the error."""
    weight = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    hidden[2] = 99.0

    def head(h: torch.Tensor) -> torch.Tensor:
        if (h == 99.0).all(dim=-1).any():
            raise RuntimeError("injected fault")
        return (h @ weight.t()).argmax(dim=-1)

    sampler = StepSampler(32, (2,), lambda: pytest.fail("no grammar"), greedy_head=head)  # type: ignore[arg-type,return-value]
    plan = sampler.prepare([step_sampler_seq(SamplingParams(temperature=0)) for _ in range(4)])
    assert sampler.reads_hidden(plan)
    tokens = sampler.collect(sampler.sample_hidden(hidden, plan))
    assert tokens[2] == -1 and list(plan.faults.errors) == [2]
    assert plan.faults.errors[2].startswith("sampling: RuntimeError")
    expected = (hidden @ weight.t()).argmax(dim=-1)
    assert [tokens[i] for i in (0, 1, 3)] == expected[[0, 1, 3]].tolist()


@pytest.mark.parametrize(
    "other",
    [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=0, logprobs=1),
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, logit_bias=((3, 1.0),)),
        SamplingParams(temperature=0, min_tokens=2),
    ],
)
def test_a_step_reads_hidden_states_only_when_every_row_is_plain_greedy(other):  # type: ignore[no-untyped-def]
    sampler = StepSampler(32, (2,), lambda: pytest.fail("no grammar"), greedy_head=torch_argmax)  # type: ignore[arg-type,return-value]
    greedy = step_sampler_seq(SamplingParams(temperature=0))
    assert sampler.reads_hidden(sampler.prepare([greedy, greedy]))
    assert not sampler.reads_hidden(sampler.prepare([greedy, step_sampler_seq(other)]))
    without = StepSampler(32, (2,), lambda: pytest.fail("no grammar"))  # type: ignore[arg-type,return-value]
    assert not without.reads_hidden(without.prepare([greedy]))


def step_sampler_seq(params: SamplingParams):  # type: ignore[no-untyped-def]
    from prefixbatch.scheduling.sequence import Sequence

    return Sequence(0, [5, 6, 7], 3, params, seed=params.seed or 0)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, ValueError])
def test_a_forward_fault_stops_the_batch_and_leaves_the_engine_idle(llm, monkeypatch, error):  # type: ignore[no-untyped-def]
    prompts, params = batch(SamplingParams(max_tokens=6, temperature=0))
    clean = llm.generate(prompts, params)
    runner = llm.engine.runner
    calls = {"n": 0}
    original = runner.execute

    def execute(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise error("the device fell over")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", execute)
    with pytest.raises(error, match="fell over"):
        llm.generate(prompts, params)
    assert_idle(llm)
    again = llm.generate(prompts, params)  # the next batch runs
    assert all(same_answer(a, b) for a, b in zip(again, clean))


def test_a_generator_closed_early_leaves_the_engine_idle(llm):  # type: ignore[no-untyped-def]
    from prefixbatch.outputs import Request

    prompts, params = batch(SamplingParams(max_tokens=6, temperature=0))
    gen = llm.engine.generate([Request(i, p, s) for i, (p, s) in enumerate(zip(prompts, params))])
    next(gen)
    assert llm.engine.has_unfinished()
    gen.close()
    assert_idle(llm)


def test_isolate_reruns_row_by_row_only_when_the_batch_fails():  # type: ignore[no-untyped-def]
    faults: Faults[int] = Faults()
    calls: list[object] = []

    def one(k: int) -> None:
        calls.append(k)
        if k == 2:
            raise KeyError(k)

    faults.isolate("stage", [0, 1, 2], lambda: calls.append("batch"), one)
    assert calls == ["batch"] and not faults.errors
    faults.fail(0, "earlier")
    faults.isolate("stage", [0, 1, 2, 3], lambda: 1 / 0, one)  # 0 failed before: not rerun
    assert calls[1:] == [1, 2, 3] and faults.errors == {0: "earlier", 2: "stage: KeyError: 2"}
    # One live row and a batch that fails because of a row that failed before: it reruns.
    faults.isolate("next", [0, 1], lambda: 1 / 0, lambda k: None)
    assert 1 not in faults
    for shared in (MemoryError, torch.OutOfMemoryError):
        with pytest.raises(shared):
            faults.isolate("stage", [1], lambda e=shared: (_ for _ in ()).throw(e()), one)


def test_through_the_cli_job(tmp_path, tiny_models, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    import json

    from test_job import chat_line, records, write_jsonl

    from prefixbatch.cli import main

    lines = [chat_line(i, max_tokens=1 + i) for i in range(5)]  # finishing step by step
    lines[2]["body"]["max_tokens"] = 7  # the chosen line: its text fails
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = [
        "run",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(tiny_models["llama"]),
        "--device",
        "cpu",
    ]
    with monkeypatch.context() as mp:
        inject_detokenizer(mp)
        assert main([*args, "--block-size", "8", "--kv-cache-memory", "16MiB"]) == 0
    err = capsys.readouterr().err
    assert "requests: 4 ok, 1 failed" in err and "Traceback" not in err
    recs = {r["custom_id"]: r for r in records(out)}
    assert recs["chat-2"]["error"] == {
        "code": "server_error",
        "message": "line 3: detokenizing: RuntimeError: injected fault",
        "line": 3,
    }
    assert all(recs[f"chat-{i}"]["error"] is None for i in (0, 1, 3, 4))
    # A forward fault stops the job with what finished written; the next run completes it.
    runner_execute = _fail_forward_after(monkeypatch, steps=4)
    with pytest.raises(RuntimeError, match="the device fell over"):
        main([*args, "--overwrite", "--block-size", "8", "--kv-cache-memory", "16MiB"])
    written = [json.loads(x) for x in out.read_text().splitlines()]
    monkeypatch.undo()
    assert runner_execute["n"] == 5 and 1 <= len(written) < 5
    assert all(r["error"] is None for r in written)
    assert main([*args, "--block-size", "8", "--kv-cache-memory", "16MiB"]) == 0
    assert all(r["error"] is None for r in records(out)) and len(records(out)) == 5


def _fail_forward_after(mp: pytest.MonkeyPatch, steps: int) -> dict[str, int]:
    from prefixbatch.execution.model_runner import ModelRunner

    calls = {"n": 0}
    original = ModelRunner.execute

    def execute(self: ModelRunner, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > steps:
            raise RuntimeError("the device fell over")
        return original(self, *args, **kwargs)

    mp.setattr(ModelRunner, "execute", execute)
    return calls
