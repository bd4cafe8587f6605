"""`pensieve serve`: the OpenAI-compatible server. The engine runs on the main thread (where the model was loaded:
torch on a second thread is slower on CPU, docs/serving.md), uvicorn's event loop on a thread of its own."""

from __future__ import annotations

import argparse
import signal
import threading
import time

from pensieve.server.app import ServerConfig, create_app
from pensieve.server.store import Store


class Server:
    """uvicorn serving the API on a thread of its own; the engine driven by `run` (this thread) or by `start`'s
    own thread (`engine_thread=True`: tests, notebooks)."""

    def __init__(self, gen, tokenizer, host: str = "127.0.0.1", port: int = 0, config: ServerConfig | None = None,
                 disk_dir=None, log_level: str = "warning") -> None:  # fmt: skip
        import uvicorn

        self.gen = gen
        self.store = Store(disk_dir)
        self.app = create_app(gen, tokenizer, self.store, config)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(self.app, host=host, port=port, log_level=log_level, lifespan="off", timeout_keep_alive=30,
                           timeout_graceful_shutdown=10)
        )  # fmt: skip
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._engine_thread = False
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, engine_thread: bool = False) -> Server:
        """Start serving HTTP (returns once the socket listens); the engine too when engine_thread."""
        self._engine_thread = engine_thread
        if engine_thread:
            self._spawn(self.gen.serve, self._stop)
        self._spawn(self._uvicorn.run)
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if not self._threads[-1].is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        return self

    def run(self) -> None:
        """Until `stop` (or SIGINT / SIGTERM on the main thread): drive the engine on this thread, or just wait if
        `start(engine_thread=True)` gave it a thread of its own."""
        if threading.current_thread() is threading.main_thread():  # stop between steps, never inside one
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.shutdown())
        try:
            if self._engine_thread:
                while not self._stop.wait(0.5):
                    pass
            else:
                self.gen.serve(self._stop)
        except KeyboardInterrupt:
            pass

    def shutdown(self) -> None:
        """Stop taking requests, let the running ones finish (10 s at most), then stop the engine; returns at once."""
        self._uvicorn.should_exit = True
        http = self._threads[-1]

        def then_stop_engine() -> None:
            http.join()
            self._stop.set()

        threading.Thread(target=then_stop_engine, daemon=True).start()

    def stop(self) -> None:
        """Stop HTTP and the engine; the generator stays open (close it to write its KV to disk)."""
        self._uvicorn.should_exit = True
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.store.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)


def load_model(model: str | None, dtype: str):
    """The model alone (a picklable factory for cluster instances: `functools.partial(load_model, path, dtype)`)."""
    return load(model, dtype)[0]


def kv_capacity(stats: dict, disk_dir: str | None, cache=None) -> str:
    """The start-up line naming the KV capacity per tier (in tokens: what a peer's budget is compared against) and
    the scheduler's limits, as the engine holds them (per instance, with --instances)."""
    from pensieve.server.metrics import instances_of

    instances = instances_of(stats)
    one = instances[0]
    bs, device, host = one["block_size"], one["device_blocks_total"], one["host_blocks_total"]
    gib = device * one["kv_bytes_per_block"] / 2**30
    disk = f"; disk tier in {disk_dir}" if disk_dir else "; no disk tier"
    if disk_dir and cache is not None:
        disk += (f" (write-behind after {cache.write_behind_s:g} s idle, {cache.write_behind_mb_s:g} MiB/s)"
                 if cache.write_behind_s is not None else " (no write-behind)")  # fmt: skip
    each = f" (each of {len(instances)} instances)" if "per_instance" in stats else ""
    kv = f", {one['kv_dtype']}" if one.get("kv_dtype") else ""
    return (f"pensieve: KV cache{each}: device {device} blocks x {bs} = {device * bs} tokens ({gib:.3f} GiB{kv}); host"
            f" {host} blocks = {host * bs} tokens{disk}; max_num_seqs {one['max_num_seqs']}, max_num_batched_tokens"
            f" {one['max_num_batched_tokens']}")  # fmt: skip


def load(model: str | None, dtype: str):
    """-> (model, tokenizer, name): a local HF checkpoint folder, a .gguf file (dequantized to `dtype`), a hub id
    already in the local Hugging Face cache (nothing is downloaded), or the bundled SmolLM2-135M-Instruct.
    SystemExit with what was tried when `model` is none of these."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if model is None:
        from pensieve.models.smollm2 import load_smollm2

        return (*load_smollm2(torch_dtype), "SmolLM2-135M-Instruct")
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SystemExit(f"pensieve serve: --model {model!r} is a file but not a .gguf one")
        where, kwargs, name = path.parent, {"gguf_file": path.name}, path.stem
    elif path.is_dir():
        where, kwargs, name = path, {}, path.name
    else:  # a hub id: from the local cache only (no network at run time)
        where, kwargs, name = model, {"local_files_only": True}, model
    try:
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as error:
        if path.exists():
            raise SystemExit(f"pensieve serve: --model {model!r}: {error}") from None
        raise SystemExit(
            f"pensieve serve: --model {model!r} is not a folder, not a .gguf file, and not a model in the local "
            f"Hugging Face cache (nothing is downloaded at run time: `huggingface-cli download {model}` first)"
        ) from None
    return lm, tokenizer, name


def _limit(parser, flag: str, value):
    """A retention limit: 0 is none (None), a negative one an error."""
    if value < 0:
        parser.error(f"{flag} must be >= 0 (0: no limit), got {value}")
    return value or None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pensieve serve", description="An OpenAI-compatible server whose "
                                     "conversations keep their KV (docs/serving.md).")  # fmt: skip
    parser.add_argument("--model", help="a local HF checkpoint folder, a .gguf file, or a hub id already in the local "
                        "HF cache (default: the bundled SmolLM2-135M-Instruct)")  # fmt: skip
    parser.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PENSIEVE_API_KEY, if set)")
    parser.add_argument("--disk-dir", help="keep KV and stored responses/conversations here: they survive restarts")
    parser.add_argument("--device-blocks", type=int, help="cap the device KV pool (blocks)")
    parser.add_argument("--host-blocks", type=int, default=0, help="a host KV tier of this many blocks")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--policy", choices=["pensieve", "lru"], default="pensieve",
                        help="which KV leaves a tier first: Pensieve's recompute cost over idle time, or whole "
                        "conversations least recently active first")  # fmt: skip
    parser.add_argument("--write-behind", type=float, default=5.0, metavar="SECONDS",
                        help="with --disk-dir: KV of conversations idle this long is copied to disk in the "
                        "background, so a crash loses only the last seconds' (default 5)")  # fmt: skip
    parser.add_argument("--no-write-behind", action="store_true",
                        help="KV reaches disk only when evicted there or at a clean shutdown")  # fmt: skip
    parser.add_argument("--write-behind-mb-s", type=float, default=64.0, help="the write-behind's bandwidth (MiB/s)")
    parser.add_argument("--kv-dtype", choices=["auto", "int8"], default="auto",
                        help="auto: KV in the model's dtype; int8: int8 values with a scale per token and head "
                        "(~3.8x the tokens of fp32 in the same memory, not exact)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=64, help="conversations one engine step may batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens one engine step may compute (longer prompts are chunked)")  # fmt: skip
    parser.add_argument("--chat-template", help="a Jinja chat template file used instead of the tokenizer's")
    parser.add_argument("--max-tokens", type=int, default=4096, help="the most tokens a request may generate")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20)
    parser.add_argument("--max-stored-responses", type=int, default=10_000,
                        help="stored responses kept; past it the least recently used that nothing builds on goes, "
                        "with its KV (0: no bound)")  # fmt: skip
    parser.add_argument("--records-ttl", type=float, default=30 * 86_400.0,
                        help="seconds a stored response or conversation may stay idle before it goes, with its KV "
                        "(0: kept until deleted)")  # fmt: skip
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="run every step eagerly (no torch.compile)")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="serve through a local Cluster of N instances on Ray (0: one generator in this process)",
    )
    parser.add_argument("--engine-thread", choices=["main", "worker"], default="main",
                        help="which thread steps the engine (main: measured faster on CPU)")  # fmt: skip
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    import os

    from pensieve import CacheConfig, EngineConfig, SchedulerConfig, StatefulGenerator

    t0 = time.perf_counter()
    model, tokenizer, name = load(args.model, args.dtype)
    if args.chat_template:
        try:
            tokenizer.chat_template = open(args.chat_template, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--chat-template: {error}")
    try:
        scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    except ValueError as error:
        parser.error(str(error))
    try:
        cache = CacheConfig(
            block_size=args.block_size,
            num_device_blocks=args.device_blocks,
            num_host_blocks=args.host_blocks,
            disk_dir=args.disk_dir,
            policy=args.policy,
            write_behind_s=None if args.no_write_behind else args.write_behind,
            write_behind_mb_s=args.write_behind_mb_s,
            kv_dtype=None if args.kv_dtype == "auto" else args.kv_dtype,
        )
    except ValueError as error:
        parser.error(str(error))
    engine = EngineConfig(compile=False) if args.no_compile else EngineConfig()
    config = ServerConfig(
        model_name=args.served_model_name or name,
        api_key=args.api_key or os.environ.get("PENSIEVE_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        max_messages=args.max_messages,
        max_stored_responses=_limit(parser, "--max-stored-responses", args.max_stored_responses),
        records_ttl_s=_limit(parser, "--records-ttl", args.records_ttl),
    )
    if args.instances:
        if args.instances < 1:
            parser.error("--instances must be >= 1")
        if args.disk_dir:
            parser.error("--disk-dir is not supported with --instances (a cluster keeps no disk tier yet)")
        import functools

        from pensieve.cluster import Cluster

        del model  # each instance loads its own
        factory = functools.partial(load_model, args.model, args.dtype)
        roles = ["colocated"] * args.instances
        gen = Cluster(factory, tokenizer, roles=roles, cache_config=cache, scheduler_config=scheduler,
                      engine_config=engine)  # fmt: skip
    else:
        gen = StatefulGenerator(model, tokenizer, cache, scheduler_config=scheduler, engine_config=engine)
    with gen:
        print(kv_capacity(gen.stats(), args.disk_dir, cache), flush=True)
        server = Server(gen, tokenizer, args.host, args.port, config, args.disk_dir, args.log_level)
        server.start(engine_thread=args.engine_thread == "worker")
        where = f"{args.instances} instances on Ray" if args.instances else f"engine on the {args.engine_thread} thread"
        print(f"pensieve: serving {config.model_name!r} on {server.url}/v1 (loaded in {time.perf_counter() - t0:.1f} s;"
              f" {where}; Ctrl-C stops)", flush=True)  # fmt: skip
        try:
            server.run()
        finally:
            server.stop()
    print("pensieve: stopped" + (f"; KV kept in {args.disk_dir}" if args.disk_dir else ""), flush=True)
