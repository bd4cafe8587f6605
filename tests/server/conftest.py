"""The tokenizer every server test uses: SmolLM2's (its ChatML template), loaded once."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from pensieve.models.smollm2 import GGUF_NAME, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)
