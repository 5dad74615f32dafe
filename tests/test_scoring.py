"""Scoring (``LLM.score``): decoder sequence classifiers against transformers'
``*ForSequenceClassification`` forward, and causal LM rerankers' two score tokens against the
softmax of transformers' last-position logits (fp32, <= 1e-5), with the query's tokens shared
by its documents; pair tokenization; the request and response formats; load errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_embeddings import MODES as EMBEDDING_MODES

from conftest import make_tiny_model, save_tokenizer, tiny_config
from prefixbatch import LLM
from prefixbatch.errors import ConfigError, UnsupportedModelError
from prefixbatch.io.score_format import rerank_body
from prefixbatch.io.score_request import score_request
from prefixbatch.loading.model_config import normalise
from prefixbatch.loading.score_config import read_score_config, score_token_ids
from prefixbatch.scoring import ScoreConfig, ScoreParams

TOLERANCE = 1e-5
ENGINE = dict(device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
QUERY = " ".join(f"w{5 + i}" for i in range(21))  # 21 tokens: two blocks of 8 are shared
DOCS = [" ".join(f"w{40 + 7 * i + j}" for j in range(2 + i % 5)) for i in range(10)]
FALSE, TRUE = "w10", "w11"  # a reranker's score tokens (ids 10 and 11)


def pair_template(path: Path) -> None:
    """Give the saved word-level tokenizer BOS and a pair template (``<s> A </s> B``), so a
    pair's special tokens come from the tokenizer, as a real model's do."""
    tok = json.loads((path / "tokenizer.json").read_text())
    bos, eos = ({"SpecialToken": {"id": t, "type_id": 0}} for t in ("<s>", "</s>"))
    a, b = ({"Sequence": {"id": s, "type_id": k}} for k, s in enumerate("AB"))
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, a],
        "pair": [bos, a, eos, b],
        "special_tokens": {
            "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
            "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
        },
    }  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(tok))


def make_classifier(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny random one-label ``*ForSequenceClassification``, saved by transformers."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(family)
    config.num_labels = 1
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(path))
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def score_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Classifiers (``qwen3``, ``llama``: its tokenizer with a pair template) and causal LMs
    to rerank with score tokens (``qwen3-lm``, ``gemma2-lm``: final logit soft-capping)."""
    root = tmp_path_factory.mktemp("score-models")
    models = {f: make_classifier(root / f, f) for f in ("qwen3", "llama")}
    pair_template(models["llama"])
    for family in ("qwen3", "gemma2"):
        models[f"{family}-lm"] = make_tiny_model(root / f"{family}-lm", family)
    return models


def pair_ids(path: Path, pairs: list[tuple[str, str]]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return [tok(a, b)["input_ids"] for a, b in pairs]


def hf_classifier_scores(path: Path, prompts: list[list[int]]) -> list[float]:
    """sigmoid of transformers' one-label sequence classifier logit, one prompt at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    with torch.inference_mode():
        return [float(torch.sigmoid(model.eval()(torch.tensor([p])).logits[0, 0])) for p in prompts]


def hf_token_scores(path: Path, prompts: list[list[int]], false: int, true: int) -> list[float]:
    """p(true): the softmax over the two tokens' logits at a causal LM's last position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            logits = model(torch.tensor([p])).logits[0, -1]
            out.append(float(torch.softmax(logits[[false, true]], dim=0)[1]))
    return out


MODES = {**EMBEDDING_MODES, "fcfs": {"policy": "fcfs"}}  # fcfs: nothing shared


@pytest.mark.parametrize(
    "family, mode", [("qwen3", m) for m in MODES] + [("llama", "batchllm"), ("llama", "fcfs")]
)
def test_classifier_scores_match_transformers(score_models, family, mode):  # type: ignore[no-untyped-def]
    path = score_models[family]
    llm = LLM(str(path), **ENGINE, **MODES[mode])
    got = llm.score(QUERY, DOCS, use_tqdm=False)  # 1-to-N: one query, ten documents
    expected = hf_classifier_scores(path, pair_ids(path, [(QUERY, d) for d in DOCS]))
    assert len(got) == len(DOCS)
    assert max(abs(g - e) for g, e in zip(got, expected)) <= TOLERANCE
    saved = llm.engine.stats.prefill_tokens_saved
    if mode == "fcfs":
        assert saved == 0
    elif mode == "batchllm":  # the query's two full blocks were computed once for all ten
        assert saved >= 16 * (len(DOCS) - 1)
    assert llm.engine.blocks.num_available == llm.engine.limits.num_blocks  # nothing kept
    pairs = llm.score([QUERY, DOCS[0]], [DOCS[3], DOCS[4]], use_tqdm=False)  # N-to-N
    assert abs(pairs[0] - got[3]) <= TOLERANCE
    logits = llm.score(QUERY, DOCS[:2], use_activation=False, use_tqdm=False)
    assert all(abs(1 / (1 + math.exp(-x)) - s) <= TOLERANCE for x, s in zip(logits, got))


def test_pairs_are_tokenized_as_the_model_says(score_models, tmp_path):  # type: ignore[no-untyped-def]
    llm = LLM(str(score_models["llama"]), **ENGINE)
    a, b = "w5 w6", "w7"
    assert llm.tokenizer.encode_pairs([(a, b)]) == [[1, 5, 6, 2, 7]]  # <s> A </s> B
    joined = make_classifier(tmp_path / "joined", "qwen3")
    config = json.loads((joined / "config.json").read_text())
    (joined / "config.json").write_text(json.dumps({**config, "use_sep_token": False}))
    assert read_score_config(joined) == ScoreConfig("sigmoid", pair_tokens=False)
    joined_llm = LLM(str(joined), **ENGINE)
    assert joined_llm.tokenizer.encode_pairs([("w5 w6 ", "w7")]) == [[5, 6, 7]]  # one text


@pytest.mark.parametrize("family", ["qwen3-lm", "gemma2-lm"])
def test_reranker_tokens_match_softmax_of_transformers_logits(score_models, family):  # type: ignore[no-untyped-def]
    path = score_models[family]
    llm = LLM(str(path), **ENGINE, score_tokens=(FALSE, TRUE))
    got = llm.score(QUERY, DOCS, use_tqdm=False)
    expected = hf_token_scores(path, pair_ids(path, [(QUERY, d) for d in DOCS]), 10, 11)
    assert max(abs(g - e) for g, e in zip(got, expected)) <= TOLERANCE
    assert llm.engine.stats.prefill_tokens_saved >= 16 * (len(DOCS) - 1)
    raw = llm.score(QUERY, DOCS[:3], use_activation=False, use_tqdm=False)  # logit(yes - no)
    assert all(abs(math.log(e / (1 - e)) - r) <= 1e-4 for e, r in zip(expected, raw))


def test_score_errors(score_models):  # type: ignore[no-untyped-def]
    llm = LLM(str(score_models["qwen3"]), **ENGINE, max_model_len=32)
    with pytest.raises(ValueError, match="'data_1' has 2 items and 'data_2' 3"):
        llm.score(["w5", "w6"], ["w7", "w8", "w9"], use_tqdm=False)
    with pytest.raises(ValueError, match="'data_2' must be a string or a non-empty list"):
        llm.score("w5", [], use_tqdm=False)
    with pytest.raises(ValueError, match="the input has 40 tokens; the model's context is 32"):
        llm.score("w5", " ".join(["w6"] * 39), use_tqdm=False)
    causal = LLM(str(score_models["qwen3-lm"]), **ENGINE)
    with pytest.raises(ValueError, match="this model cannot score: it has no score head"):
        causal.score("w5", "w6", use_tqdm=False)
    with pytest.raises(ConfigError, match="score token 'maybe' is not a token"):
        LLM(str(score_models["qwen3-lm"]), **ENGINE, score_tokens=(FALSE, "maybe"))
    with pytest.raises(ConfigError, match="this checkpoint is a sequence classifier"):
        LLM(str(score_models["qwen3"]), **ENGINE, score_tokens=(FALSE, TRUE))
    classifier = LLM(str(score_models["qwen3"]), **ENGINE)
    with pytest.raises(ValueError, match="a sequence classifier .* cannot generate text"):
        classifier.generate("w5 w6", use_tqdm=False)  # its lm_head would be untrained
    assert classifier.embed("w5 w6", use_tqdm=False)  # its hidden states still pool


def test_cross_encoders_and_multi_label_heads_are_refused():  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    bert = BertConfig(architectures=["BertForSequenceClassification"])
    with pytest.raises(UnsupportedModelError, match="cross-encoders .* do not run here"):
        normalise(bert)
    config = tiny_config("qwen3")
    config.architectures, config.num_labels = ["Qwen3ForSequenceClassification"], 3
    with pytest.raises(UnsupportedModelError, match="3 labels: only one-label score heads"):
        normalise(config)
    config.num_labels = 1
    assert normalise(config).num_labels == 1
    assert score_token_ids({"no": 4, "yes": 9}, ("no", "yes")) == (4, 9)


def test_score_config_from_files(tmp_path: Path):  # type: ignore[no-untyped-def]
    assert read_score_config(tmp_path) == ScoreConfig()
    identity = {"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}}
    (tmp_path / "config.json").write_text(json.dumps(identity))
    assert read_score_config(tmp_path).activation == "identity"
    assert ScoreConfig("identity").activate(2.5, ScoreParams()) == 2.5
    (tmp_path / "config.json").write_text(
        json.dumps({"sbert_ce_default_activation_function": "torch.nn.modules.activation.Tanh"})
    )
    with pytest.raises(UnsupportedModelError, match="score activation"):
        read_score_config(tmp_path)
    sigmoid = ScoreConfig()
    assert sigmoid.activate(0.0, ScoreParams()) == 0.5
    assert abs(sigmoid.activate(-800.0, ScoreParams())) < 1e-300  # no overflow
    assert sigmoid.activate(-3.0, ScoreParams(use_activation=False)) == -3.0


def test_score_request_fields():  # type: ignore[no-untyped-def]
    for first, second in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
        pairs, params = score_request({first: "q", second: ["a", "b"]}, rerank=False)
        assert pairs == [("q", "a"), ("q", "b")]
        assert params.score is not None and params.score.fields == (first, second)
        assert params.embedding is not None and params.max_tokens == 1
    pairs, _ = score_request({"text_1": ["q1", "q2"], "text_2": ["a", "b"]}, rerank=False)
    assert pairs == [("q1", "a"), ("q2", "b")]
    bad = {
        "give the pairs as one of": {"query": "q"},
        "missing 'data_1'": {"text_1": "a", "data_2": "b"},
        "(got 'queries' + 'documents' and 'queries' + 'items')": {
            "queries": "a", "documents": "b", "items": "c"
        },
        "'text_2' must be a string or a non-empty list": {"text_1": "a", "text_2": []},
        "'text_2'[1] must be a string, got {\"type\": \"image_url\"}": {
            "text_1": "a", "text_2": ["b", {"type": "image_url"}]
        },
        "unknown field 'truncate_prompt_tokens' for /v1/score": {
            "text_1": "a", "text_2": "b", "truncate_prompt_tokens": 8
        },
        "'use_activation' must be true or false": {"text_1": "a", "text_2": "b",
                                                   "use_activation": 1},
    }  # fmt: skip
    for message, body in bad.items():
        with pytest.raises(ValueError) as e:
            score_request(body, rerank=False)
        assert message in str(e.value), body
    pairs, params = score_request(
        {"query": "q", "documents": ["a", "b", "c"], "top_n": 2, "return_documents": False},
        rerank=True,
    )
    assert pairs == [("q", "a"), ("q", "b"), ("q", "c")] and params.score is not None
    assert (params.score.top_n, params.score.return_documents) == (2, False)
    for message, body in {
        "'query' must be a string": {"query": ["q"], "documents": ["a"]},
        "'top_n' must be an integer >= 0": {"query": "q", "documents": ["a"], "top_n": -1},
        "unknown field 'text_1' for /v1/rerank": {"query": "q", "documents": "a", "text_1": "x"},
    }.items():
        with pytest.raises(ValueError, match=message):
            score_request(body, rerank=True)


def test_rerank_results_are_sorted_and_cut():  # type: ignore[no-untyped-def]
    scores, docs = [0.2, 0.9, 0.5, 0.7], ["a", "b", "c", "d"]
    body = rerank_body(scores, docs, 0, 12, "m", "rerank-1")
    assert [r["index"] for r in body["results"]] == [1, 3, 2, 0]
    assert body["results"][0] == {"index": 1, "document": {"text": "b"}, "relevance_score": 0.9}
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    top = rerank_body(scores, None, 2, 12, "m", "rerank-1")["results"]
    assert top == [{"index": 1, "relevance_score": 0.9}, {"index": 3, "relevance_score": 0.7}]
    assert len(rerank_body(scores, docs, 9, 12, "m", "r")["results"]) == 4  # top_n past the end
