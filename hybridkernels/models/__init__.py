"""Thin model classes (no kernels inside): the shared Llama-family transformer and its loaders."""

from .block_diffusion import BlockDiffusionOptions, BlockDiffusionPlanner
from .config import TransformerConfig
from .diffusion_cache import DiffusionKVCache
from .executor import ARExecutor, GenerationOutput, GenerationStats, PlanAnswerOutput
from .loading import load_hf_model, load_pretrained, save_pretrained
from .planner import DiffusionPlanner, PlannerBlock, PlannerOutput, PlannerStats
from .planner_options import PlannerOptions
from .projector import LatentProjector, ProjectorConfig
from .prompting import PromptTemplates
from .training import TrainResult, read_examples, train_projector
from .transformer import KVCacheHook, Transformer, TransformerOutput

__all__ = [
    "ARExecutor",
    "BlockDiffusionOptions",
    "BlockDiffusionPlanner",
    "DiffusionKVCache",
    "DiffusionPlanner",
    "GenerationOutput",
    "GenerationStats",
    "PlanAnswerOutput",
    "KVCacheHook",
    "PlannerBlock",
    "PlannerOptions",
    "PlannerOutput",
    "PlannerStats",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "load_hf_model",
    "load_pretrained",
    "save_pretrained",
    "LatentProjector",
    "ProjectorConfig",
    "PromptTemplates",
    "TrainResult",
    "read_examples",
    "train_projector",
]
