"""``unmask_step``: one confidence-ranked commit of a masked-diffusion LM."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import reference
from ..reference.unmask import UnmaskResult
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_same_dtype,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ._dispatch import choose_backend

OP = "unmask_step"
REMASKING = ("low_confidence", "random")


def _triton_unmask_step(x, **kwargs) -> UnmaskResult:
    # Imported on first use: importing hybridkernels must not import triton.
    from ..triton.unmask import unmask_step as triton_unmask_step

    return triton_unmask_step(x, **kwargs)


IMPLEMENTATIONS = {"triton": _triton_unmask_step, "reference": reference.unmask_step}
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("reference",)}


def _token_ids(name: str, ids: Sequence[int], vocab: int) -> tuple[int, ...]:
    return tuple(check_int(OP, f"{name}[{i}]", t, low=0, high=vocab - 1) for i, t in enumerate(ids))


def unmask_step(
    x: torch.Tensor,
    *,
    mask_id: int,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
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
    """Commit the most confident masked positions of a window of ``x``, in place.

    Row ``r`` of the scores predicts ``x[:, start + r]``; rows whose token is ``mask_id`` are
    committable. Give either the logits or the last hidden states and the LM head (the fused
    path: no ``[B, Lr, V]`` tensor is allocated by kernel backends).

    Args:
        x: int64 ``[B, L]`` tokens, updated in place.
        mask_id: the mask token, ``0 <= mask_id < V``.
        logits: ``[B, Lr, V]`` float16 / bfloat16 / float32 (a view, e.g. ``logits[:, s:e]``, is fine).
        hidden, lm_head: ``[B, Lr, d]`` and ``[V, d]``, same dtype (instead of ``logits``).
        start: first position of the window, ``0 <= start <= L - Lr``.
        num_transfer: int or int ``[B]``: commit the ``num_transfer[b]`` most confident masked
            rows of sequence ``b`` (LLaDA); ``0 <= num_transfer[b] <=`` masked rows in its window.
        threshold: commit every masked row with confidence ``>= threshold``, and the most
            confident one regardless (Fast-dLLM). Exactly one of ``num_transfer``/``threshold``.
        temperature: 0 = argmax; > 0 samples ``softmax(logits / temperature)`` (Gumbel-max).
            The confidence is always ``softmax(logits)`` at the candidate (LLaDA).
        remasking: ``"low_confidence"`` (rank by that confidence) or ``"random"`` (a uniform draw).
        banned_token_ids: tokens whose logit is set to ``-inf`` (LLaDA's ``logits_eos_inf``).
        deferred_token_ids: candidates in this set get confidence ``-inf``: they rank last
            (LLaDA's ``confidence_eos_eot_inf``).
        seed, generator: randomness for ``temperature > 0`` / ``random`` (at most one of them).
        backend: ``"triton"``, ``"reference"`` or None (env, then auto).

    Returns :class:`UnmaskResult` ``(x, committed [B, Lr] bool, tokens [B, Lr] int64,
    confidence [B, Lr] float32)``. At temperature 0 every backend commits exactly what the
    reference commits; ties in confidence go to the lowest position.
    """
    check_tensor(OP, "x", x, ndim=2, dtypes=(torch.int64,))
    dev = x.device
    B, L = x.shape
    if (logits is None) == (hidden is None and lm_head is None):
        raise ValueError(f"{OP}: give either logits or hidden + lm_head, not both or neither")
    if logits is not None:
        check_tensor(OP, "logits", logits, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        Lr, V = logits.shape[1], logits.shape[2]
        check_shape(OP, "logits", logits, (B, Lr, V), "[B, Lr, V]")
    else:
        if hidden is None or lm_head is None:
            raise ValueError(f"{OP}: the fused path needs both hidden and lm_head")
        check_tensor(OP, "hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
        check_tensor(OP, "lm_head", lm_head, ndim=2, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
        check_same_dtype(OP, "hidden", hidden, lm_head=lm_head)
        Lr, d = hidden.shape[1], hidden.shape[2]
        V = lm_head.shape[0]
        check_shape(OP, "hidden", hidden, (B, Lr, d), "[B, Lr, d]")
        if lm_head.shape[1] != d:
            raise ValueError(f"{OP}: lm_head is [V, {lm_head.shape[1]}] but hidden's width is {d}")
    if Lr == 0 or V == 0:
        raise ValueError(f"{OP}: empty scores (Lr = {Lr}, V = {V})")
    start = check_int(OP, "start", start, low=0, high=L - Lr)
    mask_id = check_int(OP, "mask_id", mask_id, low=0, high=V - 1)
    banned = _token_ids("banned_token_ids", banned_token_ids, V)
    deferred = _token_ids("deferred_token_ids", deferred_token_ids, V)
    if len(set(banned)) == V:
        raise ValueError(f"{OP}: banned_token_ids covers the whole vocabulary (V = {V}); no token is left")
    if remasking not in REMASKING:
        raise ValueError(f"{OP}: remasking must be one of {REMASKING}, got {remasking!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{OP}: temperature must be a finite number >= 0, got {temperature!r}")
    if seed is not None and generator is not None:
        raise ValueError(f"{OP}: give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(dev).manual_seed(check_int(OP, "seed", seed, low=0))

    if (num_transfer is None) == (threshold is None):
        raise ValueError(f"{OP}: give exactly one of num_transfer and threshold")
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"{OP}: threshold must be a number, got {threshold!r}")
    else:
        if isinstance(num_transfer, torch.Tensor):
            check_tensor(OP, "num_transfer", num_transfer, ndim=1, dtypes=INDEX_DTYPES, device=dev)
            check_shape(OP, "num_transfer", num_transfer, (B,), "[B]")
        else:
            k = check_int(OP, "num_transfer", num_transfer, low=0, high=Lr)
            num_transfer = torch.full((B,), k, dtype=torch.int64, device=dev)
        if value_checks_enabled():
            masked = (x[:, start : start + Lr] == mask_id).sum(dim=1)
            bad = (num_transfer < 0) | (num_transfer > masked)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{OP}: num_transfer[{b}] = {int(num_transfer[b])} but sequence {b} has "
                    f"{int(masked[b])} masked positions in its window; expected 0 <= num_transfer <= that"
                )

    name = choose_backend(OP, backend, dev, tuple(IMPLEMENTATIONS), AUTO_ORDER)
    return IMPLEMENTATIONS[name](
        x,
        logits=logits,
        hidden=hidden,
        lm_head=lm_head,
        mask_id=mask_id,
        start=start,
        num_transfer=num_transfer,
        threshold=threshold,
        temperature=float(temperature),
        remasking=remasking,
        banned_token_ids=banned,
        deferred_token_ids=deferred,
        generator=generator,
    )
