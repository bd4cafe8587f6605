"""The disk tier and persistence: KV chunk files, keyed by content, and per-conversation token logs under
`CacheConfig.disk_dir`.

    disk_dir/
      convs/<conv key>.log          token log of one conversation, append-only, fsync'd per completed turn
      kv/<content key>.safetensors  KV of one chunk: k, v [num_layers, block_size, Hkv, D]

`<conv key>` is a hash of the conversation id: ids never become paths. `<content key>` is the chunk's content key
(pensieve/cache/tree.py: a chained hash of every token the KV depends on; for a partial last block, of the tokens
it covers), so a chunk shared by many conversations is one file, written once. No pickle anywhere.

Token log: one record per line, `<crc32 hex> <json>`. The first record names the conversation and its mode; each
later one is a completed turn, `{"keep": n, "append": [...], "messages": [...] | null, "tools": key}` (keep the first
n tokens, append the rest; text mode: the key of the tools the tokens were rendered with, as of that turn). A torn
or corrupt record ends the log there (a crash mid-append loses only the turn whose reply never returned).

A conversation references the chunk files its tokens name: the keys of its full blocks, and of every prefix of its
last, partial block. A file no stored conversation references (and no chunk in memory uses) is removed: when the
disk_dir is opened, and when a conversation is forgotten. Nothing referenced is ever removed.

Chunk files are written to a temp file, fsync'd and renamed into place, so a crash leaves either no file or a whole
one. Their metadata carry: a checksum of the tensor bytes, the model fingerprint, the number of tokens the KV covers
and the content key. Anything that does not check out is reported (a warning) and treated as "dropped": recomputed,
never used.

Once written (and once read) a chunk file's pages are dropped from the OS page cache (`posix_fadvise(DONTNEED)`): the
KV tiers in memory are the ones pensieve budgets, so a chunk on disk is read from the disk, not from a second,
unaccounted copy in DRAM. `bytes_read` counts what was read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pensieve.cache.tree import ROOT, chunk_key, prefix_keys

FORMAT = "pensieve-kv/2"
LOG_VERSION = 1


class DiskWarning(RuntimeWarning):
    """A disk-tier problem that pensieve recovered from (by recomputing): bad file, full or unwritable disk."""


def _warn(message: str) -> None:
    warnings.warn(message, DiskWarning, stacklevel=3)


def conv_key(conv_id: str) -> str:
    return hashlib.sha256(conv_id.encode("utf-8")).hexdigest()[:40]


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy of a contiguous CPU tensor): what hashlib reads."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _checksum(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(_tensor_bytes(k))
    h.update(_tensor_bytes(v))
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Config + weights. Per parameter: name, shape, dtype, a float64 sum and a strided sample of values — a
    different checkpoint (or a fine-tune) changes it; hashing every byte of a large model at start-up would not pay."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float64)
            total = sum(piece.double().sum().item() for piece in flat.split(1 << 22))  # <= 32 MiB of float64 at once
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{total:.17g}|".encode())
            h.update(_tensor_bytes(sample))
    return h.hexdigest()


def _read_header(f) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), from a binary stream."""
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n))


def referenced_keys(tokens: list[int], block_size: int) -> set[bytes]:
    """Content keys of the chunk files a conversation with these tokens can use: its full blocks, and its last,
    partial chunk at any length it can have when idle (its last block_size positions; KV of a partial chunk covers
    however many of its positions were computed)."""
    full = prefix_keys(tokens, block_size)
    keys = set(full)
    for end in range(max(1, len(tokens) - block_size + 1), len(tokens) + 1):
        if end % block_size:
            block = (end - 1) // block_size
            keys.add(chunk_key(full[block - 1] if block else ROOT, tokens[block * block_size : end]))
    return keys


@dataclass
class StoredConversation:
    conv_id: str
    tokens: list[int]
    messages: list[dict] | None  # text mode: the chat so far; None in raw token mode
    tools: str | None = None  # text mode: the tools the tokens were rendered with (Conversation.tools)


class DiskStore:
    def __init__(self, root: str | os.PathLike, fingerprint: str, chunk_shape: tuple, dtype: torch.dtype) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.chunk_shape = tuple(chunk_shape)  # num_layers, block_size, Hkv, D
        self.block_size = self.chunk_shape[1]
        self.dtype = dtype
        self.num_write_errors = 0
        self.num_bad_files = 0
        self.num_removed_files = 0
        self.bytes_read = 0  # chunk-file bytes read back (each read goes to the disk: see _drop_cached)
        self._lock = None
        try:
            (self.root / "convs").mkdir(parents=True, exist_ok=True)
            (self.root / "kv").mkdir(exist_ok=True)
            self._lock = open(self.root / "LOCK", "a+b")  # noqa: SIM115  (held until close)
        except OSError as error:
            self.num_write_errors += 1
            _warn(f"disk tier: cannot create {self.root} ({error}); nothing will persist, evicted KV is dropped")
        if self._lock is not None:
            try:  # one generator per disk_dir: two would interleave their logs and chunk files
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise ValueError(
                    f"disk_dir {str(self.root)!r} is in use by another StatefulGenerator (in this or another process)"
                ) from None
        if in_memory_filesystem(self.root):
            _warn(f"disk tier: {self.root} is on an in-memory file system (tmpfs): its 'disk' KV is DRAM")
        self.index: dict[str, str] = self._scan()  # conv_id -> conv key, for every stored conversation
        self.files: set[bytes] = self._list_files()  # content keys of the chunk files present
        # conv_id -> content keys its tokens name (what a stored conversation references)
        self.references: dict[str, set[bytes]] = {}
        for conv_id in self.index:
            stored = self.load(conv_id)
            if stored is not None:
                self.references[conv_id] = referenced_keys(stored.tokens, self.block_size)
        self.collect(set())

    def close(self) -> None:
        """Release the disk_dir (the OS also releases it if the process dies)."""
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    # ---- token logs -------------------------------------------------------------------------------------------

    def _log_path(self, key: str) -> Path:
        return self.root / "convs" / f"{key}.log"

    def _scan(self) -> dict[str, str]:
        index = {}
        for path in sorted((self.root / "convs").glob("*.log")) if (self.root / "convs").is_dir() else []:
            try:
                with open(path, "rb") as f:
                    header = _parse_record(f.readline())
            except OSError:
                header = None
            if header is None or "conv_id" not in header or conv_key(header["conv_id"]) != path.stem:
                self.num_bad_files += 1
                _warn(f"disk tier: ignoring unreadable token log {path.name}")
                continue
            index[header["conv_id"]] = path.stem
        return index

    def append_turn(
        self,
        conv_id: str,
        keep: int,
        append: list[int],
        messages: list[dict] | None,
        tokens: list[int],
        tools: str | None = None,
    ) -> bool:
        """Make one completed turn durable (fsync'd) before its reply is returned; `tokens` is the conversation's
        whole token sequence after it, `tools` the key of the tools they were rendered with (text mode). False
        (warned) if it failed."""
        key = conv_key(conv_id)
        path = self._log_path(key)
        lines = []
        new = conv_id not in self.index
        if new:
            lines.append(_format_record({"conv_id": conv_id, "version": LOG_VERSION, "text": messages is not None}))
        record = {"keep": keep, "append": append, "messages": messages}
        if tools is not None:
            record["tools"] = tools
        lines.append(_format_record(record))
        try:
            with open(path, "ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
            if new:
                _fsync_dir(path.parent)
        except OSError as error:
            self.num_write_errors += 1
            _warn(f"disk tier: could not persist a turn of conversation {conv_id!r} ({error})")
            return False
        self.index[conv_id] = key
        self.references[conv_id] = referenced_keys(tokens, self.block_size)
        return True

    def load(self, conv_id: str) -> StoredConversation | None:
        key = self.index.get(conv_id)
        if key is None:
            return None
        tokens: list[int] = []
        messages: list[dict] | None = None
        tools: str | None = None
        try:
            with open(self._log_path(key), "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as error:
            _warn(f"disk tier: cannot read the token log of {conv_id!r} ({error})")
            return None
        *complete, _torn = lines  # the part after the last newline is a record whose write never finished
        header = _parse_record(complete[0] + b"\n") if complete else None
        if header is not None and header.get("text"):
            messages = []
        for i, line in enumerate(complete[1:], start=1):
            record = _parse_record(line + b"\n")
            try:
                tokens = tokens[: int(record["keep"])] + [int(t) for t in record["append"]]
                if messages is not None and record["messages"]:
                    messages += list(record["messages"])
                tools = record.get("tools") if isinstance(record.get("tools"), str) else None
            except (TypeError, KeyError, ValueError):
                self.num_bad_files += 1
                _warn(f"disk tier: token log of {conv_id!r} is corrupt at record {i}; using the turns before it")
                break
        return StoredConversation(conv_id, tokens, messages, tools)

    def forget(self, conv_id: str, in_use: set[bytes]) -> None:
        """Delete a stored conversation: its log, and the chunk files no other stored conversation references and no
        chunk in memory (`in_use`, content keys of disk-tier chunks) still needs."""
        key = self.index.pop(conv_id, conv_key(conv_id))
        self._log_path(key).unlink(missing_ok=True)
        self.references.pop(conv_id, None)
        self.collect(in_use)

    def collect(self, in_use: set[bytes]) -> int:
        """Remove every chunk file that no stored conversation references and `in_use` does not name. -> removed."""
        keep = set(in_use).union(*self.references.values())
        removed = 0
        for key in sorted(self.files - keep):
            try:
                self.chunk_path(key).unlink(missing_ok=True)
            except OSError:
                continue
            self.files.discard(key)
            removed += 1
        self.num_removed_files += removed
        return removed

    # ---- chunk files ------------------------------------------------------------------------------------------

    def chunk_path(self, key: bytes) -> Path:
        """Where the chunk file of content key `key` is (or would be)."""
        return self.root / "kv" / f"{key.hex()}.safetensors"

    def _list_files(self) -> set[bytes]:
        folder = self.root / "kv"
        if not folder.is_dir():
            return set()
        files = set()
        for path in folder.iterdir():
            if ".tmp" in path.name or path.is_dir():  # crash debris; the layout of format 1 (one folder a conversation)
                if path.is_dir():
                    for inner in path.iterdir():
                        inner.unlink(missing_ok=True)
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
                continue
            try:
                files.add(bytes.fromhex(path.name.removesuffix(".safetensors")))
            except ValueError:
                continue  # not ours
        return files

    def has(self, key: bytes) -> bool:
        return key in self.files

    def write_chunk(self, key: bytes, k: torch.Tensor, v: torch.Tensor, num_tokens: int) -> int:
        """KV of the chunk with content key `key`, covering `num_tokens` positions of a history.
        Returns bytes written, 0 (warned) on failure."""
        return self.record_write(key, *self.write_file(key, k, v, num_tokens))

    def write_file(self, key: bytes, k: torch.Tensor, v: torch.Tensor, num_tokens: int) -> tuple[int, OSError | None]:
        """Write the chunk file (temp file, fsync, rename) and nothing else: safe on another thread (the
        write-behind's) while this one reads and collects. -> (bytes written, None) or (0, the error); hand both to
        `record_write` on the owning thread."""
        path = self.chunk_path(key)
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "num_tokens": str(num_tokens),
            "key": key.hex(),
            "checksum": _checksum(k, v),
        }
        # a temp name of its own per thread: an eviction and a write-behind may write the same key at once
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        try:
            data = st_save({"k": k.contiguous(), "v": v.contiguous()}, metadata=meta)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                _drop_cached(f.fileno())  # written back by the fsync, so the pages can go
            os.replace(tmp, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return 0, error
        return len(data), None

    def record_write(
        self, key: bytes, written: int, error: OSError | None, instead: str = "that chunk is dropped instead"
    ) -> int:
        """The bookkeeping of a `write_file`: the file is known (or the failure counted and warned, saying what
        happens `instead`). -> written."""
        if error is not None:
            self.num_write_errors += 1
            _warn(f"disk tier: could not write a KV chunk ({error}); {instead}")
            return 0
        self.files.add(key)
        return written

    def read_chunk(self, key: bytes, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's k, v if its file is intact, of this model, and for exactly this content; else None (warned)."""
        path = self.chunk_path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                _drop_cached(f.fileno())
            self.bytes_read += len(data)
            meta = _read_header(io.BytesIO(data))["__metadata__"]
            problem = None
            if meta.get("format") != FORMAT:
                problem = "unknown format"
            elif meta.get("fingerprint") != self.fingerprint:
                problem = "written for another model"
            elif int(meta["num_tokens"]) != num_tokens or meta["key"] != key.hex():
                problem = "written for other tokens"
            else:
                tensors = st_load(data)
                k, v = tensors["k"], tensors["v"]
                if tuple(k.shape) != self.chunk_shape or tuple(v.shape) != self.chunk_shape or k.dtype != self.dtype:
                    problem = f"shape {tuple(k.shape)} {k.dtype}, expected {self.chunk_shape} {self.dtype}"
                elif _checksum(k, v) != meta["checksum"]:
                    problem = "checksum mismatch"
        except (OSError, ValueError, KeyError, TypeError, struct.error, SafetensorError) as error:
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is not None:
            self.num_bad_files += 1
            self.files.discard(key)  # unknown again: the next write of this content replaces the file
            _warn(f"disk tier: KV chunk {path.name} not used ({problem}); recomputing it")
            return None
        return k, v


def _format_record(obj: dict) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _parse_record(line: bytes) -> dict | None:
    """One log line -> its record, or None if torn (no newline) or corrupt."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def in_memory_filesystem(path: str | os.PathLike) -> bool:
    """Whether path lies on tmpfs or ramfs (/proc/mounts: the longest mount point above it; False where there is no
    /proc)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    real = os.path.realpath(path)
    above = [(point, kind) for point, kind in mounts if real == point or real.startswith(point.rstrip("/") + "/")]
    return bool(above) and max(above, key=lambda m: len(m[0]))[1] in ("tmpfs", "ramfs")


_fadvise_warned = False


def _drop_cached(fd: int) -> None:
    """Drop a file's clean pages from the OS page cache (no-op where posix_fadvise does not exist; warned once if it
    fails: the disk tier's reads may then come from memory)."""
    global _fadvise_warned
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as error:
        if not _fadvise_warned:
            _fadvise_warned = True
            _warn(f"disk tier: cannot drop chunk files from the page cache ({error}); reads may come from memory")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
