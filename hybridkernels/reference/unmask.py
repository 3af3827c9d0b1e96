"""Plain-torch definition of one masked-diffusion commit (``unmask_step``) and LLaDA's schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


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


def gumbel_noise(shape, *, generator=None, device=None) -> torch.Tensor:
    """Standard Gumbel draws ``-log(-log u)`` in float64 (``u`` uniform in (0, 1))."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(u))


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


def unmask_step(
    x: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
    mask_id: int,
    start: int = 0,
    num_transfer: torch.Tensor | None = None,
    threshold: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    banned_token_ids: Sequence[int] = (),
    deferred_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> UnmaskResult:
    """One confidence-ranked commit of a masked-diffusion LM (LLaDA / Fast-dLLM).

    ``x [B, L]`` int64 tokens; row ``r`` of ``logits [B, Lr, V]`` (or of
    ``hidden [B, Lr, d] @ lm_head[V, d].T``) predicts ``x[:, start + r]``. Rows holding
    ``mask_id`` are committable. Per row: ``banned_token_ids`` get logit ``-inf``; the candidate
    is the argmax of the logits (temperature 0) or of ``logits / T + Gumbel`` (a sample of
    ``softmax(logits / T)``); its confidence, with ``p = softmax(logits)`` (whatever the
    temperature), is ``p[candidate]`` (``low_confidence``, Dream's ``maskgit_plus``), a uniform
    draw (``random``), the top-1 minus the top-2 probability (``topk_margin``, Dream's; 0 when the
    max occurs twice) or ``sum(p log p)``, the negative entropy (``entropy``, Dream's without its
    ``+ 1e-10`` inside the log: a difference below ``V * 1e-10``), and ``-inf`` when the candidate
    is in ``deferred_token_ids`` (LLaDA's ``confidence_eos_eot_inf``). Then :func:`rank_and_commit`.
    """
    if logits is None:
        logits = hidden.float() @ lm_head.float().T
    logits = logits.float()
    B, Lr, V = logits.shape
    if len(banned_token_ids):
        logits = logits.clone()
        logits[..., list(banned_token_ids)] = float("-inf")

    if temperature > 0:
        noise = gumbel_noise(logits.shape, generator=generator, device=logits.device)
        candidate = (logits.double() / temperature + noise).argmax(dim=-1)
    else:
        candidate = logits.argmax(dim=-1)

    if remasking == "low_confidence":
        probs = torch.softmax(logits, dim=-1)
        confidence = probs.gather(-1, candidate[..., None])[..., 0]
    elif remasking == "random":
        confidence = torch.rand((B, Lr), generator=generator, device=logits.device)
    elif remasking == "topk_margin":
        top2 = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif remasking == "entropy":
        probs = torch.softmax(logits, dim=-1)
        # 0 log 0 = 0; a NaN softmax (NaN / +inf / all -inf scores) stays NaN.
        terms = torch.where(probs == 0, 0.0, probs * torch.log_softmax(logits, dim=-1))
        confidence = terms.sum(dim=-1)
    else:
        raise ValueError(
            f"remasking must be 'low_confidence', 'random', 'topk_margin' or 'entropy', got {remasking!r}"
        )
    if len(deferred_token_ids):
        deferred = torch.isin(candidate, torch.tensor(list(deferred_token_ids), device=candidate.device))
        confidence = confidence.masked_fill(deferred, float("-inf"))

    window = x[:, start : start + Lr]
    committable = window == mask_id
    confidence = torch.where(committable, confidence, torch.full_like(confidence, float("-inf")))
    tokens = torch.where(committable, candidate, window)
    committed = rank_and_commit(confidence, committable, num_transfer=num_transfer, threshold=threshold)
    window[committed] = tokens[committed]
    return UnmaskResult(x, committed, tokens, confidence)
