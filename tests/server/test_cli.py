"""`python -m pensieve serve` as users run it: its own process, the engine on the main thread, SIGTERM stops it
gracefully (KV written to the disk_dir), and a restarted server continues a stored response exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.common import hf_chain, make_model
from tests.tiny import oracle_copy

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]


def serve(model_dir: Path, disk_dir: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "pensieve", "serve", "--model", str(model_dir), "--dtype", "float64", "--port", "0",
           "--disk-dir", str(disk_dir), "--no-compile", "--block-size", "4", "--api-key", "k",
           "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if found := re.search(r"serving .* on (http://127\.0\.0\.1:\d+/v1)", line):
            return proc, found.group(1)
    raise AssertionError(f"the server did not start (exit {proc.wait()})")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    return out


def test_serve_process_restarts_on_its_disk_dir(tmp_path, tokenizer):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    oracle = oracle_copy(model)
    greedy = dict(temperature=0, max_output_tokens=6)
    proc, url = serve(tmp_path / "model", tmp_path / "kv")
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        assert client.models.list().data[0].id == "model"
        first = client.responses.create(model="model", input="Remember: blue", **greedy)
    finally:
        out = stop(proc)
    assert "stopped; KV kept in" in out
    proc, url = serve(tmp_path / "model", tmp_path / "kv")
    try:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        after = client.responses.create(model="model", input="Which colour?", previous_response_id=first.id, **greedy)
    finally:
        stop(proc)
    assert [first.output_text, after.output_text] == hf_chain(oracle, tokenizer, ["Remember: blue", "Which colour?"])
    assert after.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # read from the disk tier
