"""Megatron-style sharding of the Llama-family stack: which slice of each weight a rank holds.

* attention: q / k / v projections column-parallel by heads (rank ``r`` holds q heads
  ``[r H/N, (r+1) H/N)`` and kv heads ``[r Hkv/N, (r+1) Hkv/N)``: with GQA every q head's kv
  group is on its rank), the output projection row-parallel (its input columns), all-reduced;
* MLP: gate / up column-parallel, down row-parallel, all-reduced;
* embedding and LM head vocabulary-parallel: rank ``r`` holds rows ``vocab_range(V, r, N)``
  (contiguous, in vocabulary order; the last shard may be shorter);
* norms, q/k norms and the biases of the row-parallel projections replicated.

A rank's model is a :class:`~hybridkernels.models.Transformer` of :func:`local_config`: heads, kv
heads and intermediate size divided by ``N``, everything else (the vocabulary size included) as in
the checkpoint.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..models.config import TransformerConfig

WHERE = "tensor parallel"


class Slice(NamedTuple):
    """Rows (``dim == 0``) or columns (``dim == 1``) ``[start, stop)`` of a weight."""

    dim: int
    start: int
    stop: int


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s vocabulary rows ``[start, stop)``: chunks of ``ceil(V / N)``, in order."""
    chunk = -(-vocab_size // world_size)
    start = min(rank * chunk, vocab_size)
    return start, min(start + chunk, vocab_size)


def vocab_chunk(vocab_size: int, world_size: int) -> int:
    """The (padded) shard length ``ceil(V / N)`` every rank's vocabulary partials are sized to."""
    return -(-vocab_size // world_size)


def check_divisible(config: TransformerConfig, world_size: int) -> None:
    """``ValueError`` naming every size of ``config`` that ``world_size`` ranks cannot split."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{WHERE}: world_size must be a positive int, got {world_size!r}")
    bad = [
        f"{name} = {value}"
        for name, value in (
            ("num_heads", config.num_heads),
            ("num_kv_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % world_size
    ]
    if vocab_range(config.vocab_size, world_size - 1, world_size)[0] >= config.vocab_size:
        bad.append(f"vocab_size = {config.vocab_size} (a rank would hold no vocabulary rows)")
    if bad:
        raise ValueError(
            f"{WHERE}: the model does not split over {world_size} ranks: "
            + ", ".join(bad)
            + f" must divide by {world_size} (q heads and kv heads are split by head, so GQA groups "
            "stay whole on a rank; pick a world size that divides them)"
        )


def local_config(config: TransformerConfig, world_size: int) -> TransformerConfig:
    """The config of one rank's shard (heads, kv heads, intermediate size divided by ``world_size``;
    the vocabulary size stays the model's: token ids are global)."""
    check_divisible(config, world_size)
    return config.replace(
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


_LAYER = re.compile(r"layers\.\d+\.(.+)\.(weight|bias)")
_COLUMN_PARALLEL = {  # module -> which size its output rows split by
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "kv",
    "self_attn.v_proj": "kv",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
}
_ROW_PARALLEL = {"self_attn.o_proj": "q", "mlp.down_proj": "mlp"}


def parameter_slice(name: str, config: TransformerConfig, rank: int, world_size: int) -> Slice | None:
    """The slice of our parameter ``name`` (full shape, model ``config``) that ``rank`` holds, or
    None when it is replicated."""
    sizes = {"q": config.q_size, "kv": config.kv_size, "mlp": config.intermediate_size}
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return Slice(0, *vocab_range(config.vocab_size, rank, world_size))
    m = _LAYER.fullmatch(name)
    if m is None:
        return None  # the final norm
    module, kind = m[1], m[2]
    if module in _COLUMN_PARALLEL:
        n = sizes[_COLUMN_PARALLEL[module]] // world_size
        return Slice(0, rank * n, (rank + 1) * n)  # weight rows and bias entries alike
    if module in _ROW_PARALLEL and kind == "weight":
        n = sizes[_ROW_PARALLEL[module]] // world_size
        return Slice(1, rank * n, (rank + 1) * n)
    return None  # norms, q/k norms, the row-parallel biases (added once, after the all-reduce)
