"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace, in order)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_doc_code_runs(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_the_agent_example_keeps_the_kv_past_every_call(api):
    """examples/agent.py on the bundled model through a real server: four forced tool calls and an answer; every
    call after the first prefills at most what the history grew by + 1 (its own earlier calls are not re-rendered)."""
    import subprocess
    import sys

    pytest.importorskip("openai")
    pytest.importorskip("xgrammar")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "agent.py"), "--api", api], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = r"^\[(\d)\] (.*?) +prompt +(\d+) +reused +(\d+) +prefilled +(\d+)(?:  \(history grew by (\d+)\))?$"
    rows = re.findall(row, done.stdout, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4], done.stdout
    assert all(r[1].startswith(("get_weather(", "pack(")) for r in rows[:4]) and rows[4][1].startswith("answer")
    for _, _, prompt, reused, prefilled, grew in rows[1:]:
        assert int(prefilled) == int(prompt) - int(reused) and int(prefilled) <= int(grew) + 1, done.stdout
