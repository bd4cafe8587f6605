"""pensieve: stateful multi-turn LLM serving with a tiered KV cache.

The public API (DESIGN §1) is exported here as it lands; the paged attention op lives in `pensieve.ops`.
"""

__version__ = "0.1.0"
