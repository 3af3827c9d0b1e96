"""``unmask_step``: one confidence-ranked commit of a masked-diffusion LM."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from ..common import UnmaskResult
from ._checks import check_unmask_args
from ._dispatch import OpBackends

OP = "unmask_step"


def _triton_unmask_step(x, **kwargs) -> UnmaskResult:
    # Imported on first use: importing hybridkernels must not import triton.
    from ..triton.unmask import unmask_step as triton_unmask_step

    return triton_unmask_step(x, **kwargs)


def _compiled_unmask_step(
    x, *, logits, hidden, lm_head, temperature, remasking, generator, **kw
) -> UnmaskResult:
    # _C's one-pass scoring on the CPU; the reference whenever its margins cannot prove the
    # commit is the reference's (near-ties, non-finite scores): see ops/_unmask_cpu.py.
    from ._unmask_cpu import fused_cpu_unmask_step

    res = fused_cpu_unmask_step(x, hidden=hidden, lm_head=lm_head, **kw)
    if res is not None:
        return res
    return reference.unmask_step(
        x,
        hidden=hidden,
        lm_head=lm_head,
        temperature=temperature,
        remasking=remasking,
        generator=generator,
        **kw,
    )


def _compiled_reason(x, logits, hidden, lm_head, args) -> str | None:
    from ._unmask_cpu import unsupported_reason

    return unsupported_reason(hidden, lm_head, logits, args.temperature, args.remasking, x.device)


DISPATCH = OpBackends(
    OP,
    {"triton": _triton_unmask_step, "cuda": _compiled_unmask_step, "reference": reference.unmask_step},
    {"cuda": ("triton", "reference"), "cpu": ("cuda", "reference")},
)
IMPLEMENTATIONS, AUTO_ORDER = DISPATCH.implementations, DISPATCH.auto_order


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
        remasking: the ranking score, from ``p = softmax(logits)`` whatever the temperature:
            ``"low_confidence"`` ``p[candidate]`` (Dream's ``maskgit_plus``), ``"random"`` a uniform
            draw, ``"topk_margin"`` top-1 minus top-2 probability, ``"entropy"`` ``sum(p log p)``
            (negative entropy; Dream's rules, see :func:`hybridkernels.reference.unmask_step`).
            Dream applies its temperature before them: pass ``logits / T`` (or ``hidden / T``)
            and ``temperature=1``.
        banned_token_ids: tokens whose logit is set to ``-inf`` (LLaDA's ``logits_eos_inf``).
        deferred_token_ids: candidates in this set get confidence ``-inf``: they rank last
            (LLaDA's ``confidence_eos_eot_inf``).
        seed, generator: randomness for ``temperature > 0`` / ``random`` (at most one of them).
        backend: ``"triton"``, ``"cuda"``, ``"reference"`` or None (env, then auto). ``"cuda"`` is
            ``_C``'s CPU scoring pass (hidden + lm_head, temperature 0, ``low_confidence``), the
            automatic choice on the CPU for those inputs: it commits only what margins prove the
            reference commits and runs the reference otherwise (``ops/_unmask_cpu.py``); its
            confidences are within ~1e-3 (relative) of the reference's, its commits equal.

    Returns :class:`UnmaskResult` ``(x, committed [B, Lr] bool, tokens [B, Lr] int64,
    confidence [B, Lr] float32)``. At temperature 0 every backend commits exactly what the
    reference commits; ties in confidence go to the lowest position.

    Non-finite scores behave as in the reference (torch's rules): a NaN score is the maximum, so
    a row's first NaN is its candidate (``torch.argmax``); a row whose softmax is NaN (a NaN or
    ``+inf`` score, or only ``-inf``) has confidence NaN, which ranks before every number
    (``torch.sort``), such rows among themselves by position; ``num_transfer`` is still exact.
    """
    args = check_unmask_args(
        OP,
        x,
        mask_id=mask_id,
        logits=logits,
        hidden=hidden,
        lm_head=lm_head,
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
    # The compiled backend takes only the fused CPU argmax path; elsewhere auto moves on silently.
    name = DISPATCH.choose(
        backend, x.device, {"cuda": _compiled_reason(x, logits, hidden, lm_head, args)}, warn=False
    )
    impl = IMPLEMENTATIONS[name]
    return UnmaskResult(*impl(x, logits=logits, hidden=hidden, lm_head=lm_head, **args.backend_kwargs()))
