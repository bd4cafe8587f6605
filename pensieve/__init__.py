"""pensieve: stateful multi-turn LLM serving with a tiered KV cache (DESIGN §1 is the contract)."""

from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pensieve.engine.turn import Reply, TurnAborted
from pensieve.generator import StatefulGenerator

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "EngineConfig",
    "Reply",
    "SamplingParams",
    "SchedulerConfig",
    "StatefulGenerator",
    "TurnAborted",
]
