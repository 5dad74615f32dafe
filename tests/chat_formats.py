"""Tokenizers and chat templates of the tool-calling families, written for the tests in each
family's published format (``tests/chat_templates/*.jinja``), on byte-level vocabularies that
fit the tiny models of ``conftest.py`` (512 ids, EOS id 2; every id decodes): no download."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"
VOCAB = 512
# Two functions whose arguments a random model can finish within a few dozen tokens.
TOOL_SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["C", "F"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "get_time": {
        "type": "object",
        "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n} of a place", "parameters": s}}
    for n, s in TOOL_SCHEMAS.items()
]


@dataclass(frozen=True)
class Family:
    """``specials``: pad, BOS (None: no BOS), EOS (ids 0-2), then the other control tokens;
    ``added``: tokens that are not special (they stay in decoded text)."""

    template: str
    specials: tuple[str | None, ...]
    added: tuple[str, ...] = ()

    def chat_template(self) -> str:
        return (TEMPLATES / f"{self.template}.jinja").read_text()


FAMILIES = {
    "qwen3": Family(
        "qwen3",
        ("<|endoftext|>", None, "<|im_end|>", "<|im_start|>"),
        (
            "<tool_call>",
            "</tool_call>",
            "<think>",
            "</think>",
            "<tool_response>",
            "</tool_response>",
        ),
    ),
    "llama3_json": Family(
        "llama3_json",
        ("<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>")
        + ("<|end_header_id|>", "<|python_tag|>", "<|eom_id|>"),
    ),
    "mistral": Family(
        "mistral",
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]")
        + ("[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    ),
    "deepseek_r1": Family(
        "deepseek_r1",
        (
            "<｜pad｜>",
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
        ),
        ("<think>", "</think>"),
    ),
}


def _corpus(family: Family) -> list[str]:
    """Text like what the tests render: the template's own text and tool JSON."""
    words = "the weather time city zone unit function name arguments parameters tool call"
    tool = {"type": "function", "function": {"name": "get_weather", "description": words}}
    return [family.chat_template(), json.dumps(tool), json.dumps(tool, indent=4), words] * 4


def save_chat_tokenizer(path: Path, family: str) -> None:
    """A byte-level BPE tokenizer of ``VOCAB`` ids with the family's control tokens and chat
    template, its merges learnt from text like the tests' prompts (so prompts stay short)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    pad, bos, eos, *controls = spec.specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(controls) - len(spec.added),
        special_tokens=[pad, bos or "<unused-bos>", eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(eos) == 2
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=controls,
    )
    fast.chat_template = spec.chat_template()
    fast.save_pretrained(str(path))


def chat_model(tiny_model: Path, family: str, dest: Path) -> Path:
    """A copy of a tiny random model with the family's tokenizer and chat template."""
    shutil.copytree(tiny_model, dest)
    for old in dest.glob("tokenizer*"):
        old.unlink()
    for old in dest.glob("special_tokens_map.json"):
        old.unlink()
    save_chat_tokenizer(dest, family)
    return dest
