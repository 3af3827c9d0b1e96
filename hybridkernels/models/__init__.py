"""Thin model classes (no kernels inside): the shared Llama-family transformer and its loaders."""

from .config import TransformerConfig
from .loading import load_hf_model, load_pretrained, save_pretrained
from .transformer import KVCacheHook, Transformer, TransformerOutput

__all__ = [
    "KVCacheHook",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "load_hf_model",
    "load_pretrained",
    "save_pretrained",
]
