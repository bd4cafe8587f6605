"""What a turn's text costs on the engine's thread: µs per token for a batch of turns decoded side by side.

Each sampled token goes through its turn's `TextStream` (pensieve/engine/detokenizer.py) on the engine's thread,
between two forwards. This times, for `--batch` turns of `--tokens` tokens each (SmolLM2's tokenizer over real
text): the TextStream with tokenizers' `DecodeStream`; the same with stop strings (held back, checked on the new
text); the TextStream's Python window (a tokenizer without a Rust backend); `decode_stream`, the bare DecodeStream
calls (the floor); and `full_decode`, one `decode` of each whole reply at its end (what a turn without streaming
needs at least). The methods alternate rep by rep; medians. JSON + PNG.

Usage: python benchmarks/detokenizer.py [--batch 64] [--tokens 128] [--reps 7] [--out results/detokenizer.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from plotting import cpu_name, pyplot, save, write_results
from tokenizers.decoders import DecodeStream
from tqdm import tqdm

from pensieve.engine.detokenizer import StopStrings, TextStream
from pensieve.models.smollm2 import GGUF_NAME, smollm2_path

ROOT = Path(__file__).resolve().parents[1]


class PythonOnly:
    """Only `decode`: TextStream falls back to its Python window, as for a tokenizer without a Rust backend."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "results" / "detokenizer.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)
    text = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    replies = [ids[s : s + args.tokens] for s in (rng.randrange(len(ids) - args.tokens) for _ in range(args.batch))]
    stops = ["\n\n\n\n", "</answer>", "Observation:"]  # rare in the text: the turns run to the end
    backend = tokenizer.backend_tokenizer

    def streams(make) -> float:
        turns = [make() for _ in replies]
        t0 = time.perf_counter()
        for i in range(args.tokens):  # token by token, the batch side by side (as the engine steps)
            for turn, reply in zip(turns, replies, strict=True):
                turn.add(reply[i])
        for turn in turns:
            turn.finish()
        return time.perf_counter() - t0

    def bare_decode_stream() -> float:
        turns = [DecodeStream(skip_special_tokens=True) for _ in replies]
        t0 = time.perf_counter()
        for i in range(args.tokens):
            for turn, reply in zip(turns, replies, strict=True):
                turn.step(backend, reply[i])
        return time.perf_counter() - t0

    def full_decode() -> float:
        t0 = time.perf_counter()
        for reply in replies:
            tokenizer.decode(reply, skip_special_tokens=True)
        return time.perf_counter() - t0

    methods = {
        "text_stream": lambda: streams(lambda: TextStream(tokenizer)),
        "text_stream_stops": lambda: streams(lambda: TextStream(tokenizer, [StopStrings(stops)])),
        "python_window": lambda: streams(lambda: TextStream(PythonOnly(tokenizer))),
        "decode_stream": bare_decode_stream,
        "full_decode": full_decode,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in tqdm(range(args.reps), desc="reps"):
        for name, run in methods.items():
            times[name].append(run())
    n = args.batch * args.tokens
    rows = [
        {
            "method": name,
            "us_per_token": statistics.median(ts) / n * 1e6,
            "ms_per_step": statistics.median(ts) / args.tokens * 1e3,
        }  # fmt: skip
        for name, ts in times.items()
    ]
    cpu = cpu_name()
    print(f"{cpu}; batch {args.batch} x {args.tokens} tokens, median of {args.reps}")
    for row in rows:
        print(f"  {row['method']:18} {row['us_per_token']:7.2f} µs/token  {row['ms_per_step']:7.3f} ms per step")
    meta = {"cpu": cpu, "batch": args.batch, "tokens": args.tokens, "reps": args.reps, "stops": stops}
    write_results(args.out, meta, rows, lambda rows, path: _plot(rows, path, meta))


def _plot(rows: list[dict], path: Path, meta: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["method"] for r in rows], [r["us_per_token"] for r in rows])
    ax.set_xlabel("µs per token (engine thread)")
    ax.set_title(f"detokenizing, batch {meta['batch']}: {meta['cpu'][:60]}", fontsize=8)
    save(fig, path)


if __name__ == "__main__":
    main()
