"""The planner: radix tree, nested block-aligned groups, BatchLLM's gain rule, the report."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import nested_prompts
from prefixbatch.planning.groups import Group
from prefixbatch.planning.one_level import flatten
from prefixbatch.planning.plan import lru_prefill_tokens, make_plan
from prefixbatch.planning.prefix_tree import build_tree, unique_tokens
from prefixbatch.planning.report import tree_baselines


@st.composite
def batches(draw):  # type: ignore[no-untyped-def]
    """Prompts built from a few shared bases, so that sharing, nesting, prompts that are
    prefixes of others and exact duplicates all occur."""
    alphabet = st.integers(1, 4)
    bases = draw(st.lists(st.lists(alphabet, min_size=0, max_size=40), min_size=1, max_size=4))
    prompts = []
    for _ in range(draw(st.integers(1, 30))):
        base = draw(st.sampled_from(bases))
        if draw(st.booleans()):
            base = base + draw(st.sampled_from(bases))
        tail = draw(st.lists(alphabet, min_size=0, max_size=12))
        prompt = base + tail
        prompts.append(prompt or [1])
    return prompts


def _check_levels(plan, prompts, bs):  # type: ignore[no-untyped-def]
    for g, parent in plan.root.walk():
        reqs = g.requests()
        if parent is None:
            assert g.prefix_len == 0
            continue
        assert g.prefix_len % bs == 0 and g.prefix_len > parent.prefix_len
        assert len(reqs) >= 2
        head = prompts[reqs[0]][: g.prefix_len]
        for r in reqs:  # prefix + suffix == the request's tokens
            assert len(prompts[r]) >= g.prefix_len
            assert prompts[r][: g.prefix_len] == head
            assert head + prompts[r][g.prefix_len :] == prompts[r]


@settings(max_examples=200, deadline=None)
@given(prompts=batches(), bs=st.sampled_from([1, 2, 4, 8]), capacity=st.integers(1, 64))
def test_plan_properties(prompts, bs, capacity):  # type: ignore[no-untyped-def]
    plan = make_plan(prompts, [8] * len(prompts), bs)
    assert sorted(plan.root.requests()) == list(range(len(prompts)))  # every request once
    _check_levels(plan, prompts, bs)
    lru = lru_prefill_tokens(prompts, bs, capacity)
    lru_unbounded = lru_prefill_tokens(prompts, bs, 10**9)
    # at least the LRU-in-file-order saving (any capacity), at most the token-level tree's
    multilevel, one_level = tree_baselines(prompts, bs)
    assert multilevel <= plan.computed_prefill_tokens <= lru_unbounded <= lru
    assert plan.computed_prefill_tokens <= one_level  # never worse than one level


@settings(max_examples=100, deadline=None)
@given(prompts=batches())
def test_radix_tree_holds_every_prompt(prompts):  # type: ignore[no-untyped-def]
    root = build_tree(prompts)
    assert root.leaves == len(prompts)
    # token-level tree cost is the number of distinct non-empty prefixes
    distinct = {tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)}
    assert unique_tokens(root) == len(distinct)


def test_nested_levels_system_document_question():
    rng = random.Random(0)
    prompts = nested_prompts(rng, system=32, doc=48, docs=3, per_doc=4, vocab=(10, 99))
    rng.shuffle(prompts)
    plan = make_plan(prompts, [10] * len(prompts), 16)
    (top,) = plan.root.children
    assert top.prefix_len == 32 and len(top.children) == 3
    assert all(c.prefix_len == 80 and len(c.members) == 4 for c in top.children)
    assert plan.computed_prefill_tokens == 32 + 3 * 48 + 12 * 5


def test_prompt_equal_to_prefix_is_a_member_without_own_tokens():
    prompts = [[1] * 8, [1] * 8 + [2, 3], [1] * 8 + [4]]
    plan = make_plan(prompts, [4, 4, 4], 4)
    (g,) = plan.root.children
    assert g.prefix_len == 8 and sorted(g.members) == [0, 1, 2]
    assert plan.computed_prefill_tokens == 8 + 0 + 2 + 1


def test_order_by_decode_ratio():
    a = [[5] * 16 + [i] for i in range(3)]  # long prompts, short outputs
    b = [[6] * 4 + [i] for i in range(3)]  # short prompts, long outputs
    plan = make_plan(a + b, [2, 2, 2, 50, 50, 50], 4)
    first = plan.in_order(plan.root)[0]
    assert isinstance(first, Group) and set(first.requests()) == {3, 4, 5}


def _one_level(prompts):  # type: ignore[no-untyped-def]
    return sorted((d, sorted(m)) for d, m in flatten(build_tree(prompts)))


def test_gain_rule_lifts_a_grandchild_when_it_saves_tokens():
    c = list(range(100, 110))  # c: 10 tokens shared by everything
    g1 = [[*c, *[7] * 6, t] for t in (1, 2, 3)]  # gain (3-1)*6 - 10 = 2 > 0: lifted
    g2 = [[*c, 8, t] for t in (4, 5)]  # gain (2-1)*1 - 10 < 0: collapsed into c
    groups = _one_level(g1 + g2)
    assert groups == [(11, [3, 4]), (16, [0, 1, 2])]  # c keeps g2's longer prefix (single child)


def test_gain_rule_keeps_a_grandchild_collapsed_at_zero_gain():
    c = list(range(100, 110))
    g1 = [[*c, *[7] * 5, t] for t in (1, 2, 3)]  # gain (3-1)*5 - 10 = 0: not lifted
    g2 = [[*c, 8, t] for t in (4, 5)]
    assert _one_level(g1 + g2) == [(10, [0, 1, 2, 3, 4])]
