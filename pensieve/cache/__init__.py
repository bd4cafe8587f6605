"""KV cache bookkeeping: block pools and conversations' block tables. Pure Python + torch; no model code."""

from pensieve.cache.blocks import BlockPool
from pensieve.cache.manager import KVManager
from pensieve.cache.types import Conversation

__all__ = ["BlockPool", "Conversation", "KVManager"]
