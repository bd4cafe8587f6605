"""pensieve: stateful multi-turn LLM serving with a tiered KV cache (DESIGN §1 is the contract)."""

from pensieve.api import Capabilities, Generator
from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, StructuredOutput
from pensieve.engine.turn import Delta, Reply, TurnAborted
from pensieve.generator import StatefulGenerator
from pensieve.structured.tools import ToolUse

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "Capabilities",
    "Delta",
    "EngineConfig",
    "Generator",
    "Reply",
    "SamplingParams",
    "SchedulerConfig",
    "StatefulGenerator",
    "StructuredOutput",
    "ToolUse",
    "TurnAborted",
]
