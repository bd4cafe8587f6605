"""KV cache bookkeeping: block pools and conversations' block tables. Pure Python + torch; no model code."""

from pensieve.cache.blocks import BlockPool

__all__ = ["BlockPool"]
