"""The planner: sorted prompts and their LCPs, nested block-aligned groups, BatchLLM's gain
rule, the report; the compact (array) planner against the node-per-request reference."""

from __future__ import annotations

import random

import numpy as np
import planner_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import nested_prompts
from prefixbatch.planning.groups import Group
from prefixbatch.planning.one_level import flatten
from prefixbatch.planning.plan import make_plan
from prefixbatch.planning.prefix_sort import sort_prompts
from prefixbatch.planning.report import lru_prefill_tokens, tree_baselines, unique_tokens
from prefixbatch.planning.token_arrays import TokenArrays


@st.composite
def batches(draw):  # type: ignore[no-untyped-def]
    """Prompts built from a few shared bases, so that sharing, nesting, prompts that are
    prefixes of others and exact duplicates all occur."""
    alphabet = st.integers(0, draw(st.sampled_from([1, 4, 70_000])))
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
        reqs = g.requests().tolist()
        assert g.size == len(reqs)
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


def _canonical(g: Group) -> tuple:  # type: ignore[type-arg]
    kids = sorted(_canonical(c) for c in g.children)
    return (g.prefix_len, tuple(sorted(g.members.tolist())), tuple(kids))


@settings(max_examples=200, deadline=None)
@given(prompts=batches(), bs=st.sampled_from([1, 2, 4, 8]), capacity=st.integers(1, 64))
def test_plan_properties(prompts, bs, capacity):  # type: ignore[no-untyped-def]
    plan = make_plan(prompts, [8] * len(prompts), bs)
    assert sorted(plan.root.requests().tolist()) == list(range(len(prompts)))  # every request once
    _check_levels(plan, prompts, bs)
    arrays = TokenArrays.from_lists(prompts)
    tree = sort_prompts(arrays)
    lru = lru_prefill_tokens(arrays, tree, bs, capacity)
    lru_unbounded = lru_prefill_tokens(arrays, tree, bs, 10**9)
    # at least the LRU-in-file-order saving (any capacity), at most the token-level tree's
    multilevel, one_level = tree_baselines(arrays.lengths, tree, bs)
    assert multilevel <= plan.computed_prefill_tokens <= lru_unbounded <= lru
    assert plan.computed_prefill_tokens <= one_level  # never worse than one level


@settings(max_examples=300, deadline=None)
@given(prompts=batches(), bs=st.sampled_from([1, 2, 4, 8, 16]), capacity=st.integers(1, 64))
def test_compact_planner_equals_the_reference(prompts, bs, capacity):  # type: ignore[no-untyped-def]
    arrays = TokenArrays.from_lists(prompts)
    tree = sort_prompts(arrays)
    # The sort: sorted(...) by token ids, a prefix first, equal prompts by index.
    assert tree.order.tolist() == sorted(range(len(prompts)), key=lambda i: prompts[i])
    root = ref.build_tree(prompts)
    lengths = [len(p) for p in prompts]
    plan = make_plan(arrays, [8] * len(prompts), bs, tree)
    levels = ref.build_levels(root, bs)
    assert _canonical(plan.root) == ref.canonical(levels)
    assert plan.computed_prefill_tokens == ref.computed_tokens(levels, lengths)
    assert unique_tokens(arrays.lengths, tree) == ref.unique_tokens(root)
    multilevel, one_level = tree_baselines(arrays.lengths, tree, bs)
    assert one_level == ref.one_level_prefill_tokens(root, lengths, bs)
    assert lru_prefill_tokens(arrays, tree, bs, capacity) == ref.lru_prefill_tokens(
        prompts, bs, capacity
    )


@settings(max_examples=100, deadline=None)
@given(prompts=batches())
def test_lcps_are_the_sorted_neighbours_common_prefixes(prompts):  # type: ignore[no-untyped-def]
    tree = sort_prompts(TokenArrays.from_lists(prompts))
    ordered = [prompts[i] for i in tree.order]
    for k in range(1, len(ordered)):
        a, b = ordered[k - 1], ordered[k]
        common = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert tree.lcp[k] == common
    # token-level tree cost is the number of distinct non-empty prefixes
    distinct = {tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)}
    assert unique_tokens(np.array([len(p) for p in prompts]), tree) == len(distinct)


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
    first = next(plan.in_order(plan.root))
    assert isinstance(first, Group) and set(first.requests().tolist()) == {3, 4, 5}


def _one_level(prompts):  # type: ignore[no-untyped-def]
    """(depth, members) of each group of two or more, and how many requests are alone."""
    arrays = TokenArrays.from_lists(prompts)
    tree = sort_prompts(arrays)
    groups, singles = flatten(tree.order, tree.lcp, arrays.lengths)
    return sorted((d, m.count) for d, m in groups), singles.count


def test_gain_rule_lifts_a_grandchild_when_it_saves_tokens():
    c = list(range(100, 110))  # c: 10 tokens shared by everything
    g1 = [[*c, *[7] * 6, t] for t in (1, 2, 3)]  # gain (3-1)*6 - 10 = 2 > 0: lifted
    g2 = [[*c, 8, t] for t in (4, 5)]  # gain (2-1)*1 - 10 < 0: collapsed into c
    assert _one_level(g1 + g2) == ([(11, 2), (16, 3)], 0)  # c keeps g2's prefix (single child)


def test_gain_rule_keeps_a_grandchild_collapsed_at_zero_gain():
    c = list(range(100, 110))
    g1 = [[*c, *[7] * 5, t] for t in (1, 2, 3)]  # gain (3-1)*5 - 10 = 0: not lifted
    g2 = [[*c, 8, t] for t in (4, 5)]
    assert _one_level(g1 + g2) == ([(10, 5)], 0)
