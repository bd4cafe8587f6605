"""Prometheus metrics (prometheus_client, a registry per app): requests, tokens, time to first token, where each
turn's history KV was found, what was recomputed, the cache's blocks per tier and the disk tier's bytes moved (read
from `stats()` at scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def instances_of(stats: dict) -> list[dict]:
    """The per-engine stats in `stats()` of a StatefulGenerator (itself) or of a Cluster (each instance's)."""
    return list(stats["per_instance"].values()) if "per_instance" in stats else [stats]


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pensieve_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("pensieve_prompt_tokens", "Prompt tokens of finished turns", registry=r)
        self.generation_tokens = Counter("pensieve_generation_tokens", "Tokens generated", registry=r)
        self.prefilled = Counter("pensieve_prefilled_tokens", "Tokens fed before a first token", registry=r)
        self.cache_hits = Counter(
            "pensieve_cache_hit_tokens", "Prompt tokens whose KV was reused, by tier", ["tier"], registry=r
        )
        self.recomputed = Counter("pensieve_recomputed_tokens", "History tokens computed again", registry=r)
        self.ttft = Histogram("pensieve_ttft_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r)
        self.blocks = Gauge("pensieve_kv_blocks", "KV blocks per tier", ["tier", "state"], registry=r)
        self.conversations = Gauge("pensieve_conversations", "Conversations in memory", registry=r)
        self.running = Gauge("pensieve_running_turns", "Turns running", registry=r)
        self.disk_bytes = Gauge(
            "pensieve_disk_kv_bytes", "KV chunk-file bytes moved since start", ["direction"], registry=r
        )
        self.clean = Gauge("pensieve_kv_clean_chunks", "Chunks in memory with a clean copy on disk", registry=r)
        self.preemptions = Gauge("pensieve_preemptions", "Running turns preempted since start", registry=r)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def turn(self, reply, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(reply.token_ids))
        self.prefilled.inc(reply.num_prefilled)
        self.cache_hits.labels("device").inc(reply.num_reused_device)
        self.cache_hits.labels("host").inc(reply.num_reused_host)
        self.cache_hits.labels("disk").inc(reply.num_reused_disk)
        self.recomputed.inc(reply.num_recomputed)
        self.ttft.observe(reply.ttft_s)

    def render(self, stats: dict) -> bytes:
        """`stats()` of a StatefulGenerator, or of a Cluster (its instances' summed)."""
        instances = instances_of(stats)
        for tier in ("device", "host"):
            total = sum(s[f"{tier}_blocks_total"] for s in instances)
            free = sum(s[f"{tier}_blocks_free"] for s in instances)
            self.blocks.labels(tier, "used").set(total - free)
            self.blocks.labels(tier, "free").set(free)
        self.conversations.set(stats["conversations"])
        self.running.set(sum(s["active_turns"] for s in instances))
        self.disk_bytes.labels("read").set(sum(s["bytes_read_disk"] for s in instances))
        self.disk_bytes.labels("written").set(sum(s["bytes_written_disk"] for s in instances))
        self.disk_bytes.labels("written_behind").set(sum(s.get("bytes_written_behind", 0) for s in instances))
        self.clean.set(sum(s.get("clean_chunks", 0) for s in instances))
        self.preemptions.set(sum(s.get("preemptions", 0) for s in instances))
        return generate_latest(self.registry)
