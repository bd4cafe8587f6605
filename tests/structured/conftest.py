"""Fixtures of the structured tests: SmolLM2's tokenizer (its own template: no tool support, the generic fallback),
the same with a Hermes template that renders tools, and a tiny float64 model behind them (ChatML's end as EOS)."""

import copy
from pathlib import Path

import pytest
import transformers as tf

from pensieve.models.smollm2 import GGUF_NAME, smollm2_path
from tests.tiny import tiny_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}  # a tool with an enum-only schema (a forced call is valid JSON at any budget)

HERMES_TEMPLATE = (Path(__file__).parents[1] / "fixtures" / "hermes_tools.jinja").read_text()


@pytest.fixture(scope="session")
def smol_tokenizer():
    return tf.AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def hermes_tokenizer(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = HERMES_TEMPLATE
    return tok


def chat_model(tokenizer, seed: int):
    """A tiny float64 llama over the tokenizer's vocabulary, ChatML's end of turn as its EOS."""
    model = tiny_model("llama", vocab=len(tokenizer), seed=seed)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return chat_model(smol_tokenizer, seed=7)
