"""``unmask_step`` with the vocabulary split across tensor-parallel ranks, without gathering logits.

Each rank scores its vocabulary rows ``[v0, v1)`` (``hidden @ lm_head_shard.T``) and reduces every
row of the window to the partials the Triton kernel keeps per vocabulary split: the max, its
first (global) index, the sum of ``exp(score - max)``, at temperature > 0 the max of
``score / T + Gumbel``, its index and its raw score, and what the confidence rule needs (the second
largest score for ``topk_margin``, ``sum e^(l-m) (l-m)`` for ``entropy``, the ``random`` draw). One
all-gather of those ``[B, Lr, 9]`` float64 values (``[N_ranks, B, Lr, 9]``: 72 bytes per row and
rank, whatever ``V``), then every rank runs the same merge (ranks in vocabulary order: the first
maximum wins ties, as ``torch.argmax``) and the reference's commit
(:func:`hybridkernels.reference.unmask.rank_and_commit`), so every rank writes the same tokens.

Against the single-device op (:func:`hybridkernels.reference.unmask_step`) on the same scores:
candidates are identical (maxima and argmaxes merge exactly; the Gumbel noise of token ``v`` is the
reference's draw for ``v``: every rank draws the reference's whole ``[B, Lr, V]`` noise from the
same generator and keeps its columns, so the generator advances as on one device); confidences
are the same softmax up to float rounding (the sum of exponentials is summed rank by rank), so the
committed rows are identical unless two rows' confidences are within an ulp. The ``random``
remasking draw comes after the noise, as in the reference (rank 0's, gathered with the partials).

Randomness: every rank must hold the same generator state (``init_from_env`` seeds torch's default
generator alike on every rank); a rank seeded differently draws its shard's noise differently,
which still gives every rank the same tokens (the merge reads the gathered partials) but not the
single-device op's.

The torch path (any device) holds the shard's ``[B, Lr, V_r]`` float32 scores (and at
temperature > 0 the whole ``[B, Lr, V]`` float64 noise). The Triton path (CUDA, when the kernel
has the vocabulary-shard entry point of :func:`triton_shard_entry`) runs the kernel's partial
stage on the shard with global token ids (its Philox counter ``row * V + token`` is the global
token id: the same samples as one device's Triton op), all-gathers the per-split partials and runs
its commit stage on them: no scores in memory.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

from ..common import UnmaskResult
from ..ops._checks import check_unmask_args
from ..reference.unmask import gumbel_noise, rank_and_commit
from ..validation import check_tensor
from .group import TPGroup
from .sharding import vocab_chunk

OP = "vocab_parallel_unmask_step"
REMASKING = ("low_confidence", "random", "topk_margin", "entropy")
# Partials, per (row, rank): max, argmax, sumexp, gumbel max, gumbel argmax, gumbel argmax's score,
# the rank's ``random`` remasking draw (rank 0's is used), the second largest score (counted with
# multiplicity: ``topk_margin``) and sum e^(l - m) (l - m) (``entropy``).
M, ARG, SUMEXP, GMAX, GARG, GLOGIT, RANDOM, M2, ENT = range(9)
N_PARTIALS = 9


def shard_partials(
    scores: torch.Tensor,
    vocab_start: int,
    noise: torch.Tensor | None,
    temperature: float,
    remasking: str = "low_confidence",
) -> torch.Tensor:
    """Partials of one vocabulary shard: ``scores [..., V_r]`` float32 (banned tokens already
    ``-inf``), ``noise [..., V_r]`` float64 Gumbel draws (None at temperature 0) -> float64
    ``[..., 9]`` (indices global: ``+ vocab_start``; the fields ``remasking`` does not need are 0)."""
    m, arg = scores.max(dim=-1)  # NaN is the maximum, its first index (torch's rule)
    # A shard of -inf only (banned tokens) sums exp(-inf - 0) = 0; +inf and NaN rows are NaN.
    ref = torch.where(torch.isfinite(m) | m.isnan(), m, torch.zeros_like(m))
    shifted = scores - ref[..., None]
    e = torch.exp(shifted)
    out = scores.new_zeros((*scores.shape[:-1], N_PARTIALS), dtype=torch.float64)
    out[..., M], out[..., ARG], out[..., SUMEXP] = (
        m.double(),
        (arg + vocab_start).double(),
        e.sum(-1).double(),
    )
    if noise is not None:
        g, garg = (scores.double() / temperature + noise).max(dim=-1)
        out[..., GMAX], out[..., GARG] = g, (garg + vocab_start).double()
        out[..., GLOGIT] = scores.gather(-1, garg[..., None])[..., 0].double()
    if remasking == "topk_margin":
        second = (
            scores.topk(2, dim=-1).values[..., 1] if scores.shape[-1] > 1 else torch.full_like(m, -torch.inf)
        )
        out[..., M2] = second.double()
    elif remasking == "entropy":
        out[..., ENT] = torch.where(e == 0, 0.0, e * shifted).sum(-1).double()  # 0 log 0 = 0
    return out


def _pick(parts: torch.Tensor, key: int, field: int) -> torch.Tensor:
    """``parts [N_ranks, ...]``'s ``field`` at the first rank maximising ``key`` (NaN first)."""
    winner = parts[..., key].argmax(dim=0, keepdim=True)
    return parts[..., field].gather(0, winner)[0]


def merge_argmax(parts: torch.Tensor) -> torch.Tensor:
    """``parts [N_ranks, ..., >= 2]`` (max, global argmax per rank) -> int64 ``[...]``: the first
    maximum in vocabulary order (``torch.argmax`` over the whole vocabulary)."""
    return _pick(parts, M, ARG).long()


def merge_partials(
    parts: torch.Tensor, sample: bool, remasking: str = "low_confidence"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``parts [N_ranks, ..., 9]`` -> (candidate int64 ``[...]``, confidence float32 ``[...]``: with
    ``p = softmax(scores)``, ``p[candidate]`` (``low_confidence``; ``random``: the caller's draw),
    the top-1 minus the top-2 probability (``topk_margin``) or ``sum(p log p)`` (``entropy``); NaN
    when the row's softmax is NaN: a NaN or +inf score, or only -inf)."""
    m = parts[..., M].float()
    top = m.max(dim=0).values  # NaN propagates
    has_nan = m.isnan().any(dim=0)
    scale = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp(m - top))
    total = (parts[..., SUMEXP].float() * scale).sum(dim=0)
    if sample:
        candidate = _pick(parts, GMAX, GARG).long()
        score = _pick(parts, GMAX, GLOGIT).float()
        confidence = torch.exp(score - top) / total
    else:
        candidate = merge_argmax(parts)
        confidence = 1.0 / total  # exp(max - max) / sumexp
    if remasking == "topk_margin":
        # The second largest of all scores: the largest after removing the winning rank's max once.
        winner = m.argmax(dim=0, keepdim=True)
        others = m.scatter(0, winner, parts[..., M2].float().gather(0, winner))
        second = others.max(dim=0).values
        confidence = (1.0 - torch.exp(second - top)) / total
    elif remasking == "entropy":
        # sum_v e^(l-M) (l-M) over every shard (each rescaled from its own max), / S - log S.
        shift = torch.where(m == float("-inf"), torch.zeros_like(m), m - top)
        ent = (scale * (parts[..., ENT].float() + shift * parts[..., SUMEXP].float())).sum(dim=0)
        confidence = ent / total - torch.log(total)
    bad = has_nan | (top == float("inf")) | (top == float("-inf"))
    return candidate, confidence.masked_fill(bad, float("nan"))


def vocab_parallel_unmask_step(
    x: torch.Tensor,
    *,
    hidden: torch.Tensor,
    lm_head_shard: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    group: TPGroup,
    mask_id: int,
    start: int = 0,
    num_transfer: torch.Tensor | int | None = None,
    threshold: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    banned_token_ids: Sequence[int] = (),
    deferred_token_ids: Sequence[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> UnmaskResult:
    """:func:`hybridkernels.ops.unmask_step` (fused path) with the LM head split by vocabulary.

    Args (beyond the op's): ``hidden [B, Lr, d]`` (the same on every rank), ``lm_head_shard
    [V_r, d]`` (this rank's rows ``[vocab_start, vocab_start + V_r)``, same dtype), ``vocab_size``
    (the model's ``V``), ``group`` (:class:`TPGroup`). ``backend``: ``"reference"`` (the torch
    path), ``"triton"`` (the Triton kernel on the shard, when it has the entry point of
    :func:`triton_shard_entry`) or None (Triton on CUDA tensors when available, else the torch
    path). Every rank returns the same :class:`UnmaskResult`; ``x`` is updated in place on every
    rank. See the module docstring for what equals the single-device op.
    """
    if backend not in (None, "reference", "triton"):
        raise ValueError(f"{OP}: backend must be 'triton', 'reference' or None, got {backend!r}")
    triton_op = triton_shard_entry() if backend == "triton" or (backend is None and x.is_cuda) else None
    if backend == "triton" and triton_op is None:
        raise ValueError(
            f"{OP}: backend='triton' needs the Triton unmask kernel's vocabulary-shard entry point "
            "(hybridkernels.triton.unmask.unmask_step(..., vocab_start=, vocab_size=, vocab_chunk=, "
            "exchange=)), which this build does not have; use backend='reference'"
        )
    check_tensor(OP, "hidden", hidden, ndim=3, device=x.device)
    check_tensor(OP, "lm_head_shard", lm_head_shard, ndim=2, device=x.device)
    if hidden.dtype != lm_head_shard.dtype or hidden.shape[-1] != lm_head_shard.shape[1]:
        raise ValueError(
            f"{OP}: hidden [B, Lr, d] ({hidden.dtype}, d = {hidden.shape[-1]}) and lm_head_shard "
            f"[V_r, d] ({lm_head_shard.dtype}, d = {lm_head_shard.shape[1]}) must agree in dtype and d"
        )
    B, Lr = hidden.shape[:2]
    vocab_stop = vocab_start + lm_head_shard.shape[0]
    if not 0 <= vocab_start < vocab_stop <= vocab_size:
        raise ValueError(f"{OP}: shard rows [{vocab_start}, {vocab_stop}) are outside [0, {vocab_size})")
    # The op's checks, on a stride-0 stand-in for the [B, Lr, V] scores (no memory).
    proxy = hidden.new_empty((1, 1, 1)).expand(B, Lr, vocab_size)
    args = check_unmask_args(
        OP,
        x,
        mask_id=mask_id,
        logits=proxy,
        hidden=None,
        lm_head=None,
        start=start,
        num_transfer=num_transfer,
        threshold=threshold,
        temperature=temperature,
        remasking=remasking,
        banned_token_ids=banned_token_ids,
        deferred_token_ids=deferred_token_ids,
        seed=seed,
        generator=generator,
    )
    if triton_op is not None:
        return _triton_step(triton_op, x, hidden, lm_head_shard, vocab_start, vocab_size, group, args)
    if args.remasking not in REMASKING:
        raise ValueError(f"{OP}: remasking must be one of {REMASKING}, got {args.remasking!r}")
    scores = hidden.float() @ lm_head_shard.float().T  # [B, Lr, V_r], as the reference's product
    local_banned = tuple(t - vocab_start for t in args.banned_token_ids if vocab_start <= t < vocab_stop)
    if local_banned:
        scores.index_fill_(-1, _ids(local_banned, x.device), float("-inf"))
    sample = args.temperature > 0
    noise = None
    if sample:
        full = gumbel_noise((B, Lr, vocab_size), generator=args.generator, device=x.device)
        noise = full[..., vocab_start:vocab_stop]
    partials = shard_partials(scores, vocab_start, noise, args.temperature, args.remasking)
    if args.remasking == "random":
        partials[..., RANDOM] = torch.rand((B, Lr), generator=args.generator, device=x.device)
    parts = group.all_gather(partials)
    candidate, confidence = merge_partials(parts, sample, args.remasking)
    if args.remasking == "random":
        confidence = parts[0, ..., RANDOM].float()  # rank 0's draw, the same on every rank
    if args.deferred_token_ids:
        deferred = _ids(args.deferred_token_ids, x.device)
        confidence = confidence.masked_fill(torch.isin(candidate, deferred), float("-inf"))

    window = x[:, args.start : args.start + Lr]
    committable = window == args.mask_id
    confidence = torch.where(committable, confidence, torch.full_like(confidence, float("-inf")))
    tokens = torch.where(committable, candidate, window)
    committed = rank_and_commit(
        confidence, committable, num_transfer=args.num_transfer, threshold=args.threshold
    )
    window.copy_(torch.where(committed, tokens, window))  # no boolean indexing: no host sync
    return UnmaskResult(x, committed, tokens, confidence)


@functools.lru_cache(maxsize=64)
def _ids(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Token ids as an int64 tensor on ``device``, made once (a CUDA graph capture copies nothing)."""
    return torch.tensor(ids, dtype=torch.int64, device=device)


# The Triton kernel's keywords for a vocabulary shard (see triton_shard_entry).
TRITON_SHARD_KEYWORDS = ("vocab_start", "vocab_size", "vocab_chunk", "exchange")


def triton_shard_entry():
    """``hybridkernels.triton.unmask.unmask_step`` when it takes a vocabulary shard, else None.

    The contract (keywords :data:`TRITON_SHARD_KEYWORDS`): ``lm_head`` is the shard (global rows
    ``[vocab_start, vocab_start + V_r)``), ``vocab_size`` the model's ``V`` (the ban list, the
    argmax and the Philox counter ``row * V + token`` use global ids), ``vocab_chunk`` the padded
    shard length every rank sizes its splits from (so all ranks have the same number of splits),
    and after the partial stage the kernel calls ``exchange(part_f, part_i, n_rows, n_splits)``
    and commits from the ``(part_f, part_i, n_splits)`` it returns: every rank's splits, in
    vocabulary order. With aligned splits the result is bit-identical to the single-device kernel
    (same tokens, samples and confidences)."""
    try:
        from ..triton.unmask import unmask_step
    except Exception:  # no triton
        return None
    params = inspect.signature(unmask_step).parameters
    return unmask_step if all(k in params for k in TRITON_SHARD_KEYWORDS) else None


def _triton_step(op, x, hidden, lm_head_shard, vocab_start, vocab_size, group: TPGroup, args) -> UnmaskResult:
    """The Triton kernel on this rank's shard; the per-split partials all-gathered between its
    partial and commit stages (``[n_fields, B Lr, n_splits]`` float32 and int32 per rank)."""
    world = group.world_size

    def exchange(part_f, part_i, n_rows, n_splits):
        def merged(part):
            every = group.all_gather(part)  # [N_ranks, n_fields, n_rows * n_splits]
            every = every.view(world, part.shape[0], n_rows, n_splits).permute(1, 2, 0, 3)
            return every.reshape(part.shape[0], n_rows * world * n_splits).contiguous()

        return merged(part_f), merged(part_i), world * n_splits

    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    if lm_head_shard.stride(-1) != 1:  # the kernel reads each row's d values at unit stride
        lm_head_shard = lm_head_shard.contiguous()
    return UnmaskResult(
        *op(
            x,
            hidden=hidden,
            lm_head=lm_head_shard,
            vocab_start=vocab_start,
            vocab_size=vocab_size,
            vocab_chunk=vocab_chunk(vocab_size, world),
            exchange=exchange,
            **args.backend_kwargs(),
        )
    )
