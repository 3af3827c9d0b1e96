"""The naive autoregressive loop: a full forward over the whole sequence for every new token.

No KV cache: each step re-runs the model over prefix + prompt + everything generated so far. It
is the baseline :class:`~hybridkernels.models.ARExecutor` is benchmarked against and must match
token for token at temperature 0, and the spec of its token choice (:func:`sample_tokens`, which
the executor calls too) and of its stopping rule (HF ``generate``'s):

* temperature 0: greedy argmax (``top_k`` / ``top_p`` ignored, as HF does without sampling);
* temperature > 0: logits / temperature, then top-k, then top-p (HF's warper order and tie
  rules), then one draw from the softmax by the exponential race ``argmax(p / E)``,
  ``E ~ Exp(1)`` (what gpt-fast does: no host sync, CUDA-graph safe);
* a row that has emitted an EOS id emits ``pad_token_id`` from then on; the loop stops when
  every row has finished or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ARLoopOutput(NamedTuple):
    """``tokens [N, T]`` int64 new tokens (finished rows padded; ``T`` = steps until every row
    finished, at most ``max_new_tokens``), ``lengths [N]`` int64 tokens per row up to and
    including its first EOS."""

    tokens: torch.Tensor
    lengths: torch.Tensor


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
    from ``softmax(filter_logits(...))``. No host sync."""
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


@torch.no_grad()
def ar_generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_embeds: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> ARLoopOutput:
    """Generate with a full forward per token (no cache).

    ``model``: a :class:`~hybridkernels.models.Transformer` (anything with ``embed(ids)`` and
    ``model(inputs_embeds=, attention_mask=, position_ids=)`` returning ``.logits``).
    ``input_ids [B, L]`` left-padded with ``attention_mask [B, L]`` (1 = token); ``prefix_embeds
    [B, P, d]`` go before the prompt's embeddings (positions ``0 .. P-1``, the prompt's continue
    after them, pads skipped). ``num_samples`` repeats each row (rows ``b * num_samples + s``).
    ``pad_token_id`` defaults to the first EOS id (else 0).
    """
    embeds, mask = [], []
    if prefix_embeds is not None:
        embeds.append(prefix_embeds)
        mask.append(torch.ones(prefix_embeds.shape[:2], dtype=torch.bool, device=prefix_embeds.device))
    if input_ids is not None:
        embeds.append(model.embed(input_ids))
        mask.append(
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        )
    x = torch.cat(embeds, dim=1).repeat_interleave(num_samples, dim=0)
    valid = torch.cat(mask, dim=1).repeat_interleave(num_samples, dim=0)
    eos_ids = eos_tensor(eos_token_id, x.device)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0

    N = x.shape[0]
    finished = torch.zeros(N, dtype=torch.bool, device=x.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        logits = model(inputs_embeds=x, attention_mask=valid, position_ids=positions).logits[:, -1]
        tokens = emit_tokens(
            sample_tokens(logits, temperature, top_k, top_p, generator), finished, eos_ids, pad_token_id
        )
        new_tokens.append(tokens)
        x = torch.cat([x, model.embed(tokens[:, None])], dim=1)
        valid = torch.cat([valid, valid.new_ones(N, 1)], dim=1)
        if bool(finished.all()):
            break
    tokens = torch.stack(new_tokens, dim=1)
    return ARLoopOutput(tokens, generated_lengths(tokens, eos_ids))
