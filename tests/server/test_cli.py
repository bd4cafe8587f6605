"""`python -m pensieve serve` as users run it: its own process, the engine on the main thread, SIGTERM stops it
gracefully (KV written to the disk_dir), and a restarted server continues a stored response exactly."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server.common import hf_chain, make_model
from tests.tiny import oracle_copy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

ROOT = Path(__file__).resolve().parents[2]


def serve(model_dir: Path, disk_dir: Path, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    """-> the server process, its base URL, and the lines it printed up to the one naming it."""
    cmd = [sys.executable, "-m", "pensieve", "serve", "--model", str(model_dir), "--dtype", "float64", "--port", "0",
           "--disk-dir", str(disk_dir), "--no-compile", "--block-size", "4", "--api-key", "k",
           "--log-level", "warning", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if found := re.search(r"serving .* on (http://127\.0\.0\.1:\d+/v1)", line):
            return proc, found.group(1), lines
    raise AssertionError(f"the server did not start (exit {proc.wait()}): {''.join(lines)}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    return out


def test_serve_process_restarts_on_its_disk_dir(tmp_path, tokenizer):
    """Also: --chat-template replaces the checkpoint's template, the start-up line names the KV capacity and the
    scheduler limits, and /metrics counts the disk tier's bytes read back."""
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    oracle = oracle_copy(model)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = "{{- 'Served with a template file.' }}" + tokenizer.chat_template
    (tmp_path / "chat.jinja").write_text(tokenizer.chat_template)
    greedy = dict(temperature=0, max_output_tokens=6)
    flags = ("--chat-template", str(tmp_path / "chat.jinja"), "--device-blocks", "40", "--max-num-seqs", "3")
    proc, url, lines = serve(tmp_path / "model", tmp_path / "kv", *flags)
    capacity = "".join(lines)
    assert "KV cache: device 40 blocks x 4 = 160 tokens" in capacity
    assert "max_num_seqs 3, max_num_batched_tokens 512" in capacity  # (read back from the engine)
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        assert client.models.list().data[0].id == "model"
        first = client.responses.create(model="model", input="Remember: blue", **greedy)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Remember: blue"}], tokenize=True,
                                                 add_generation_prompt=True)  # fmt: skip
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert first.usage.input_tokens == len(rendered)  # the prompt was rendered with the file's template
    finally:
        out = stop(proc)
    assert "stopped; KV kept in" in out
    proc, url, _ = serve(tmp_path / "model", tmp_path / "kv", *flags)
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        after = client.responses.create(model="model", input="Which colour?", previous_response_id=first.id, **greedy)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": "Bearer k"}).text
    finally:
        stop(proc)
    read = re.search(r'^pensieve_disk_kv_bytes\{direction="read"\} (\S+)$', metrics, re.M)
    assert read is not None and float(read.group(1)) > 0, metrics
    assert [first.output_text, after.output_text] == hf_chain(oracle, tokenizer, ["Remember: blue", "Which colour?"])
    assert after.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # read from the disk tier


def test_serve_killed_after_an_idle_moment_restarts_with_the_kv_the_write_behind_copied(tmp_path, tokenizer):
    """SIGKILL: no graceful shutdown writes anything. The write-behind had copied the idle conversations' KV, so the
    restarted server continues them from disk (before it, a kill lost every conversation's KV)."""
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    oracle = oracle_copy(model)
    greedy = dict(temperature=0, max_output_tokens=6)
    flags = ("--device-blocks", "40", "--write-behind", "0.2")
    proc, url, lines = serve(tmp_path / "model", tmp_path / "kv", *flags)
    assert "write-behind after 0.2 s idle" in "".join(lines)
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        first = [client.responses.create(model="model", input=text, **greedy) for text in ("Remember: blue", "Hi")]
        metrics_url = url.removesuffix("/v1") + "/metrics"
        deadline = time.monotonic() + 60
        while True:  # idle: wait until the write-behind has copied every chunk of both conversations
            metrics = httpx.get(metrics_url, headers={"Authorization": "Bearer k"}).text
            behind = float(re.search(r'^pensieve_disk_kv_bytes\{direction="written_behind"\} (\S+)$', metrics, re.M)[1])
            clean = float(re.search(r"^pensieve_kv_clean_chunks (\S+)$", metrics, re.M)[1])
            used = float(re.search(r'^pensieve_kv_blocks\{state="used",tier="device"\} (\S+)$', metrics, re.M)[1])
            if behind > 0 and clean == used:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    proc, url, _ = serve(tmp_path / "model", tmp_path / "kv", *flags)
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        after = [client.responses.create(model="model", input=text, previous_response_id=r.id, **greedy)
                 for text, r in zip(("Which colour?", "Again"), first, strict=True)]  # fmt: skip
    finally:
        stop(proc)
    for r, later in zip(first, after, strict=True):
        assert later.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens  # from the disk copies
    assert [first[0].output_text, after[0].output_text] == hf_chain(
        oracle, tokenizer, ["Remember: blue", "Which colour?"]
    )
    assert [first[1].output_text, after[1].output_text] == hf_chain(oracle, tokenizer, ["Hi", "Again"])


def load_in_subprocess(model: str, cache: Path) -> subprocess.CompletedProcess:
    code = ("from pensieve.server.cli import load; lm, tok, name = load(__import__('sys').argv[1], 'float64'); "
            "print('loaded', name, type(lm).__name__, len(tok))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, env=env, timeout=300)


def test_model_is_a_folder_a_gguf_file_or_a_cached_hub_id(tmp_path, tokenizer):
    # a hub id already in the local cache (hub layout: snapshots/<commit>, refs/main): loaded without the network
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / ("0" * 40)
    make_model(tokenizer).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs" / "main").write_text("0" * 40)
    done = load_in_subprocess("acme/tiny-chat", tmp_path / "hub")
    assert done.returncode == 0 and f"loaded acme/tiny-chat LlamaForCausalLM {len(tokenizer)}" in done.stdout, done
    # one that is not cached: a clear error, nothing downloaded
    missing = load_in_subprocess("acme/not-here", tmp_path / "hub")
    assert missing.returncode != 0
    assert "not a model in the local Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "hub" / "models--acme--not-here").exists()
    # a file that is not a .gguf
    (tmp_path / "weights.bin").write_bytes(b"x")
    wrong = load_in_subprocess(str(tmp_path / "weights.bin"), tmp_path / "hub")
    assert wrong.returncode != 0 and "not a .gguf" in wrong.stderr


def test_model_as_the_bundled_gguf_file(tokenizer):
    from pensieve.models.smollm2 import GGUF_NAME, smollm2_path
    from pensieve.server.cli import load

    lm, tok, name = load(str(Path(smollm2_path()) / GGUF_NAME), "float32")
    assert name == Path(GGUF_NAME).stem and len(tok) == len(tokenizer)
    assert tok.encode("Hello world") == tokenizer.encode("Hello world")
    assert lm.config.num_hidden_layers == 30 and lm.config.vocab_size == len(tokenizer)
