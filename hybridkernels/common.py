"""Helpers the fast paths share (models, ops, kernels): token-id constants, the unmask result,
LLaDA's step split and commit rule, HF-style token choice and stopping, the Triton-interpreter
switch. Imports torch only.

:mod:`hybridkernels.reference` defines the same things for itself (it is the spec and imports
nothing from the package); the tests check that the two agree.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

# LLaDA-8B's special tokens (GSAI-ML/LLaDA-8B-*): [MASK], <|endoftext|> (EOS), <|eot_id|> (EoT).
LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
LLADA_EOT_ID = 126348


def triton_interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


# --------------------------------------------------------------------------- masked diffusion
class UnmaskResult(NamedTuple):
    """What one denoising commit did. All per-row tensors cover the window ``x[:, start:start+Lr]``.

    x: the token tensor, updated in place.
    committed: bool ``[B, Lr]``, rows written in this step.
    tokens: int64 ``[B, Lr]``, the candidate of every masked row (the current token elsewhere).
    confidence: float32 ``[B, Lr]``, the ranking score of every masked row, ``-inf`` elsewhere.
    """

    x: torch.Tensor
    committed: torch.Tensor
    tokens: torch.Tensor
    confidence: torch.Tensor


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's split of each row's masked positions over ``steps`` steps.

    ``mask_index`` bool ``[B, L]`` -> int64 ``[B, steps]``: ``n // steps`` per step, the first
    ``n % steps`` steps one more.
    """
    n = mask_index.sum(dim=1, keepdim=True)
    base, rem = n // steps, n % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]
    return base + (step < rem).long()


def rank_and_commit(
    confidence: torch.Tensor,
    committable: torch.Tensor,
    *,
    num_transfer: torch.Tensor | None,
    threshold: float | None,
) -> torch.Tensor:
    """Choose which rows to commit. Returns bool ``[B, Lr]``.

    Only ``committable`` rows are eligible; they rank by ``confidence`` (descending, ties to the
    lowest index). ``num_transfer [B]``: the first ``num_transfer[b]`` of them. ``threshold``:
    every row with ``confidence >= threshold``, and the first in rank whatever its confidence
    (Fast-dLLM's rule), in every sequence that has a committable row.
    """
    B, Lr = confidence.shape
    key = torch.where(committable, confidence.double(), float("-inf"))
    # Rank by (committable first, confidence desc, index asc): a stable sort on confidence,
    # then a stable sort on committability keeps both orders.
    by_conf = torch.sort(key, dim=1, descending=True, stable=True).indices
    by_commit = torch.sort(committable.gather(1, by_conf).long(), dim=1, descending=True, stable=True)
    order = by_conf.gather(1, by_commit.indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(Lr, device=order.device).expand(B, Lr))

    if num_transfer is not None:
        chosen = rank < num_transfer.to(rank.device)[:, None]
    else:
        chosen = (confidence >= threshold) | (rank == 0)
    return chosen & committable


# --------------------------------------------------------------------------- autoregressive
def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """``logits [N, V]`` -> float32 ``logits / temperature`` with the tokens top-k / top-p drop
    set to ``-inf`` (HF ``TopKLogitsWarper`` / ``TopPLogitsWarper``: ties with the k-th value are
    kept; top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``, at
    least one)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids ``[N]`` int64 from ``logits [N, V]``: argmax at temperature 0, else one draw
    from ``softmax(filter_logits(...))`` by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``
    (no host sync, CUDA-graph safe)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def emit_tokens(
    sampled: torch.Tensor, finished: torch.Tensor, eos_ids: torch.Tensor | None, pad_token_id: int
) -> torch.Tensor:
    """HF's stopping bookkeeping for one step: finished rows emit ``pad_token_id``; rows that emit
    an EOS id are marked in ``finished`` (bool ``[N]``, updated in place). Returns the tokens."""
    tokens = torch.where(finished, torch.full_like(sampled, pad_token_id), sampled)
    if eos_ids is not None:
        finished |= (tokens[:, None] == eos_ids).any(-1)
    return tokens


def generated_lengths(tokens: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` tokens per row of ``tokens [N, T]`` up to and including the first EOS (else ``T``)."""
    N, T = tokens.shape
    if eos_ids is None or T == 0:
        return torch.full((N,), T, dtype=torch.long, device=tokens.device)
    is_eos = torch.isin(tokens, eos_ids)
    first = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, T)
    return first.long()


def eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    """``eos_token_id`` (None, an int or a sequence of ints) as an int64 tensor, or None."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, (list, tuple, torch.Tensor)):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)
