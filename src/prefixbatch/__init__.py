"""prefixbatch: offline LLM batch inference with global prefix sharing."""

from .grammar_spec import GrammarSpec
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "GrammarSpec", "RequestOutput", "SamplingParams"]
