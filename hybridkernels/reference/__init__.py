"""Plain-torch definitions of every op: the spec the kernels are tested against."""

from .attention import bidirectional_attention, decode_attention
from .block_diffusion import BlockDiffusionResult, block_diffusion_generate
from .dream import dream_block_generate, dream_generate
from .kv_cache import kv_append
from .llada import LLaDAStats, llada_generate
from .unmask import UnmaskResult, get_num_transfer_tokens, rank_and_commit, unmask_step

__all__ = [
    "UnmaskResult",
    "bidirectional_attention",
    "decode_attention",
    "get_num_transfer_tokens",
    "kv_append",
    "rank_and_commit",
    "unmask_step",
    "LLaDAStats",
    "llada_generate",
    "dream_generate",
    "dream_block_generate",
    "BlockDiffusionResult",
    "block_diffusion_generate",
]
