"""The Dream family of :class:`~hybridkernels.models.planner.DiffusionPlanner`: one denoising step.

Dream (HKUNLP, Dream-v0-*-7B) is a Qwen2 stack initialised from an autoregressive model, so the
token at position ``i`` is predicted by the output at ``i - 1``: a window ``[s, e)`` is scored by
the hidden rows ``[s - 1, e - 1)``. The fused LM head + unmask op gets exactly those rows (no
logits tensor); with a cache, the cached steps run the queries ``[s - 1, ...)`` so that their
first rows are the window's scores (Fast-dLLM's Dream cache runs its blocks from ``s``, with ``s``
committed when the block starts: :class:`~hybridkernels.schedules.DreamBlockSchedule`).

Dream's token choice and confidence (its ``sample_tokens``): ``logits / temperature``, then top-p,
top-k, then ``softmax``; the confidence rule is ``alg``'s (``ops.unmask_step``'s ``remasking``).
``origin`` commits each masked position with probability ``1 - s / t`` (one uniform draw per masked
position, row-major over the batch, as Dream); ``alg_temp > 0`` draws the committed positions from
``softmax(confidence / alg_temp)`` (``torch.multinomial`` over Dream's own ``[B, width]`` layout,
so that with the same generator state the draws are Dream's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from .planner_options import DREAM_RULES

LAYOUTS = ("sequence", "block", "suffix")


@dataclass(frozen=True)
class DreamStepKey:
    """What a Dream step bakes in. rule: ``ops.unmask_step``'s ``remasking`` (None for
    ``origin``); layout: the span ``alg_temp``'s softmax covers (Dream's whole sequence,
    Fast-dLLM's block from ``s``, or its suffix from ``s`` with the prefix cache)."""

    rule: str | None
    alg_temp: float | None
    top_p: float | None
    top_k: int | None
    layout: str


def dream_step_key(options, *, blocks: bool) -> DreamStepKey:
    """The :class:`DreamStepKey` of :class:`~hybridkernels.models.PlannerOptions` ``options``."""
    # With a threshold the confidence is the max probability (Fast-dLLM's confidence_threshold).
    alg = "maskgit_plus" if options.threshold is not None else options.dream_alg
    layout = "sequence" if not blocks else ("suffix" if options.cache == "prefix" else "block")
    alg_temp = float(options.alg_temp) if options.alg_temp else None
    top_p = float(options.top_p) if options.top_p is not None and options.top_p < 1 else None
    return DreamStepKey(DREAM_RULES.get(alg), alg_temp, top_p, options.top_k, layout)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter on ``[..., V]`` float logits: tokens past cumulative probability
    ``top_p`` (the first always kept) get ``finfo.min``."""
    ordered, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(
        torch.zeros_like(remove).scatter_(-1, order, remove), torch.finfo(logits.dtype).min
    )


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's top-k filter: logits below the ``top_k``-th largest get ``finfo.min``."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_hidden(planner, ws, full: bool, slots: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``[B, W, d]``: the hidden rows scoring the window ``slots`` (Dream's shift by one).

    No cache or a full step: rows ``slots - 1`` of a forward over the whole sequence. A cached step
    runs ``queries`` (from ``slots[0] - 1``: the window, or the suffix with the prefix cache)
    against the K/V buffer and keeps its first ``W`` rows."""
    model = planner.model
    fwd = dict(causal=False, compute_logits=False, attention_backend=planner.backend)
    if ws.kv is None:
        return model(ws.x, ws.valid, position_ids=ws.pos, **fwd).hidden.index_select(1, slots - 1)
    if full:
        ws.kv.set_queries(ws.all_slots, ws.length)
        return ws.forward(model, ws.x, ws.pos, **fwd).index_select(1, slots - 1)
    ws.kv.set_queries(queries, ws.length)
    q_ids, q_pos = ws.x.index_select(1, queries), ws.pos.index_select(1, queries)
    return ws.forward(model, q_ids, q_pos, **fwd)[:, : slots.numel()]


def dream_step(planner, ws, key, full: bool, slots, queries, generator) -> None:
    """One Dream denoising step on the window ``slots`` (see the module); writes ``ws.x`` and
    ``ws.count`` like the LLaDA step. ``key``: the planner's step key, ``key.dream`` a
    :class:`DreamStepKey`."""
    model, x, d = planner.model, ws.x, key.dream
    hidden = dream_hidden(planner, ws, full, slots, queries)
    temperature = 0.0
    if key.temperature > 0:  # Dream's softmax(logits / T) for the token *and* its confidence
        hidden = (hidden.float() / key.temperature).to(hidden.dtype)
        temperature = 1.0
    if d.top_p is not None or d.top_k is not None:
        logits = hidden.float() @ model.lm_head_weight.float().T  # the window's rows only
        if d.top_p is not None:
            logits = top_p_filter(logits, d.top_p)
        if d.top_k is not None:
            logits = top_k_filter(logits, d.top_k)
        scores = {"logits": logits}
    else:
        scores = {"hidden": hidden, "lm_head": model.lm_head_weight}
    unmask = getattr(model, "unmask_step", ops.unmask_step)
    op_kw = dict(
        mask_id=planner.mask_id, temperature=temperature, generator=generator, backend=planner.backend
    )
    window = x.index_select(1, slots)
    if d.rule is not None and d.alg_temp is None:
        rule = (
            {"threshold": key.threshold} if key.threshold is not None else {"num_transfer": ws.num_transfer}
        )
        committed = unmask(window, remasking=d.rule, **rule, **scores, **op_kw).committed
    else:
        proposal = unmask(
            window, remasking=d.rule or "low_confidence", num_transfer=ws.no_transfer, **scores, **op_kw
        )
        committable = window == planner.mask_id
        if d.rule is None:
            committed = _origin_commit(committable, ws.p_transfer, generator)
        else:
            committed = _alg_temp_commit(ws, d, slots, proposal.confidence, committable, generator)
        window = torch.where(committed, proposal.tokens, window)
    x.index_copy_(1, slots, window)
    ws.count.copy_(committed.sum(dim=1))


def _origin_commit(committable: torch.Tensor, p_transfer: torch.Tensor, generator) -> torch.Tensor:
    """Dream's ``origin``: a uniform draw per committable row, row-major over the batch (one draw
    of ``torch.rand(n)`` as Dream's), committed when below ``p_transfer``."""
    n = int(committable.sum())
    draw = torch.rand(n, generator=generator, device=committable.device)
    u = torch.ones(committable.shape, device=committable.device).masked_scatter_(committable, draw)
    return committable & (u < p_transfer)


def _alg_temp_commit(ws, d: DreamStepKey, slots, confidence, committable, generator) -> torch.Tensor:
    """``k = num_transfer`` positions drawn from ``softmax(confidence / alg_temp)`` over Dream's
    span (``-inf`` outside the window): the sequence, or Fast-dLLM's block / suffix from ``s``."""
    k = int(ws.num_transfer.max())
    if k == 0:
        return torch.zeros_like(committable)
    B, W = committable.shape
    lo = 0 if d.layout == "sequence" else int(slots[0]) - 1
    hi = ws.length if d.layout != "block" else int(slots[-1]) + 1
    span = torch.full((B, hi - lo), float("-inf"), device=confidence.device)
    span[:, slots - lo] = confidence
    index = torch.multinomial(F.softmax(span / d.alg_temp, dim=-1), num_samples=k, generator=generator)
    chosen = torch.zeros_like(span, dtype=torch.bool).scatter_(1, index, True)
    return chosen[:, slots - lo] & committable
