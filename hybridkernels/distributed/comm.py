"""Per-step communication of the tensor-parallel stack, computed from the model's shape.

Per forward of ``T`` tokens in ``B`` rows (``d`` = hidden size, ``b`` = bytes per element):

* two all-reduces per layer (attention output, MLP down) of ``B T d b`` bytes each, one for the
  embedding (vocabulary-parallel lookup);
* the LM head: the planner's unmask all-gathers ``B Lr x 9`` float64 partials per rank; the
  executor's greedy token choice ``N x 2`` float64; sampled decoding gathers the logits
  (``N x ceil(V / N_ranks)`` in the model dtype per rank).

``payload`` is what a rank hands to the collectives; ``ring_traffic`` what a ring algorithm sends
per rank (all-reduce ``2 (n-1)/n x`` payload, all-gather ``(n-1) x`` its payload).
"""

from __future__ import annotations

from .. import benchmarking
from ..models.config import TransformerConfig
from .sharding import check_divisible, vocab_chunk
from .unmask import N_PARTIALS


def step_communication(
    config: TransformerConfig,
    world_size: int,
    *,
    batch: int,
    tokens: int,
    lm_head_rows: int,
    lm_head: str = "unmask",
    dtype_bytes: int = 2,
) -> dict:
    """Bytes and collectives of one step on ``world_size`` ranks.

    ``tokens``: positions each row runs through the stack this step (planner without cache:
    prompt + generation; dual cache: the block; executor decode: 1). ``lm_head_rows``: rows
    scored by the LM head per sequence (the planner's window ``Lr``; the executor: 1).
    ``lm_head``: ``"unmask"`` (planner), ``"greedy"`` or ``"sampled"`` (executor).
    Returns a dict: ``all_reduces``, ``all_reduce_bytes``, ``all_gather_bytes`` (payload per rank),
    ``payload_bytes``, ``ring_traffic_bytes``.
    """
    check_divisible(config, world_size)
    if lm_head not in ("unmask", "greedy", "sampled"):
        raise ValueError(
            f"step_communication: lm_head must be 'unmask', 'greedy' or 'sampled', got {lm_head!r}"
        )
    n = world_size
    activation = batch * tokens * config.hidden_size * dtype_bytes
    all_reduces = 2 * config.num_layers + 1
    reduce_bytes = all_reduces * activation
    rows = batch * lm_head_rows
    if lm_head == "unmask":
        gather = rows * N_PARTIALS * 8
    elif lm_head == "greedy":
        gather = rows * 2 * 8
    else:
        gather = rows * vocab_chunk(config.vocab_size, n) * dtype_bytes
    if n == 1:
        reduce_bytes = gather = 0
    ring = (2 * (n - 1) / n) * reduce_bytes + (n - 1) * gather
    return {
        "world_size": n,
        "all_reduces": all_reduces if n > 1 else 0,
        "all_reduce_bytes": reduce_bytes,
        "all_gather_bytes": gather,
        "payload_bytes": reduce_bytes + gather,
        "ring_traffic_bytes": int(ring),
    }


def llada_8b() -> TransformerConfig:
    """LLaDA-8B's shape (32 layers, d 4096, 32 heads without GQA, MLP 12288, V 126464)."""
    return benchmarking.LLADA_8B


def llama_8b() -> TransformerConfig:
    """Llama-3.1-8B's shape (32 layers, d 4096, 32 q / 8 kv heads, MLP 14336, V 128256)."""
    return benchmarking.LLAMA_8B
