"""HF causal LMs served through the "pensieve" attention implementation."""

from pensieve.models.attention import ATTN_IMPLEMENTATION, pensieve_attention, register
from pensieve.models.support import SUPPORTED_FAMILIES, ModelShape, model_shape

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_FAMILIES", "ModelShape", "model_shape", "pensieve_attention", "register"]
