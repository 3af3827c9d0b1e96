"""Thin model classes (no kernels inside): the shared Llama-family transformer and its loaders."""

from .config import TransformerConfig
from .executor import ARExecutor, GenerationOutput, GenerationStats, PlanAnswerOutput
from .loading import load_hf_model, load_pretrained, save_pretrained
from .transformer import KVCacheHook, Transformer, TransformerOutput

__all__ = [
    "ARExecutor",
    "GenerationOutput",
    "GenerationStats",
    "PlanAnswerOutput",
    "KVCacheHook",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "load_hf_model",
    "load_pretrained",
    "save_pretrained",
]
