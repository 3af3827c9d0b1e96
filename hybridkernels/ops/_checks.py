"""What the ops check beyond :mod:`hybridkernels.validation`: dtypes and head dims of the
contracts, the value-check switch (checks that sync with the device), and ``unmask_step``'s
argument rules."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..validation import (
    check_choice,
    check_int,
    check_number,
    check_same_dtype,
    check_shape,
    check_tensor,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# The head dims the Triton attention kernels are tuned and compiled for; the ops take any
# head_dim >= 1 and run the reference (or SDPA) on the others.
HEAD_DIMS = (32, 64, 96, 128, 256)
_VALUE_CHECKS = contextvars.ContextVar("hybridkernels_value_checks", default=True)

__all__ = [
    "FLOAT_DTYPES",
    "HEAD_DIMS",
    "INDEX_DTYPES",
    "check_has_data",
    "check_no_self_overlap",
    "check_head_dim",
    "head_dim_reason",
    "check_op_int",
    "check_same_dtype",
    "check_scale",
    "check_shape",
    "check_tensor",
    "check_unmask_args",
    "skip_value_checks",
    "value_checks_enabled",
]


def check_head_dim(op: str, d: int) -> None:
    """Every op takes any head_dim >= 1 (the reference does); kernels that cover fewer say so
    through :func:`head_dim_reason` and the dispatch falls back."""
    if d < 1:
        raise ValueError(f"{op}: head_dim must be >= 1, got {d}")


def head_dim_reason(kernels: str, d: int, supported=HEAD_DIMS) -> str | None:
    """Why ``kernels`` (e.g. ``"the Triton attention kernels"``) cannot take head_dim ``d``, or
    None: a dispatch ``extra_reason``."""
    if d in supported:
        return None
    return f"{kernels} cover head_dim {supported}, got head_dim {d}"


def check_has_data(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` is not a meta tensor: the ops that read values (positions, lengths, counts) need
    data (the other inputs must be on ``t``'s device, so checking the first one is enough)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{op}: {name} is on meta (a tensor without data); {op} reads values: give cpu or cuda tensors"
        )


def check_no_self_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """``t``, written in place, has no two elements at one address (an ``expand``-ed tensor does:
    its writes would race and overwrite each other). Conservative: a layout whose strides do not
    nest is refused too; slices with gaps are fine."""
    extent = 0
    dims = sorted((abs(stride), size) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)
    for stride, size in dims:
        if stride <= extent:
            raise ValueError(
                f"{op}: {name} (shape {tuple(t.shape)}, strides {t.stride()}) has elements that share "
                f"memory (an expand()-ed or overlapping view); {op} writes it in place: pass "
                f"{name}.contiguous() or a tensor of its own"
            )
        extent += (size - 1) * stride


def check_op_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """:func:`~hybridkernels.validation.check_int` that also takes one-element integer tensors."""
    return check_int(op, name, value, low=low, high=high, allow_tensor=True)


def check_scale(op: str, scale) -> None:
    """``scale`` is None (``1 / sqrt(D)``) or a finite number."""
    if scale is not None:
        check_number(op, "scale", scale)


def value_checks_enabled() -> bool:
    """Whether to check tensor *values* (positions, lengths, counts): each costs a host sync.

    Off while a CUDA graph is being captured or torch.compile is tracing, and when
    ``HYBRIDKERNELS_SKIP_VALUE_CHECKS=1`` or inside :func:`skip_value_checks` (the kernels still
    never write out of bounds).
    """
    if not _VALUE_CHECKS.get() or os.environ.get("HYBRIDKERNELS_SKIP_VALUE_CHECKS", "") not in ("", "0"):
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    compiler = getattr(torch, "compiler", None)
    return not (compiler is not None and compiler.is_compiling())


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within this block (this thread / task) the ops skip their value checks, as under capture:
    for callers whose indices are valid by construction (the executor's decode loop)."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


# --------------------------------------------------------------------------- unmask_step
# "topk_margin" / "entropy": Dream's confidence rules (top-1 minus top-2 probability, sum p log p).
REMASKING = ("low_confidence", "random", "topk_margin", "entropy")


@dataclass(frozen=True)
class UnmaskArgs:
    """``unmask_step``'s arguments after :func:`check_unmask_args`: what every backend takes."""

    mask_id: int
    start: int
    num_transfer: torch.Tensor | None
    threshold: float | None
    temperature: float
    remasking: str
    banned_token_ids: tuple[int, ...]
    deferred_token_ids: tuple[int, ...]
    generator: torch.Generator | None

    def backend_kwargs(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _unmask_scores_shape(op, x, logits, hidden, lm_head) -> tuple[int, int]:
    """``(Lr, V)`` of the scores: ``logits [B, Lr, V]`` or ``hidden [B, Lr, d]`` + ``lm_head [V, d]``."""
    B, dev = x.shape[0], x.device
    if (logits is None) == (hidden is None and lm_head is None):
        raise ValueError(f"{op}: give either logits or hidden + lm_head, not both or neither")
    if logits is not None:
        check_tensor(op, "logits", logits, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        Lr, V = logits.shape[1], logits.shape[2]
        check_shape(op, "logits", logits, (B, Lr, V), "[B, Lr, V]")
        return Lr, V
    if hidden is None or lm_head is None:
        raise ValueError(f"{op}: the fused path needs both hidden and lm_head")
    check_tensor(op, "hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
    check_tensor(op, "lm_head", lm_head, ndim=2, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
    check_same_dtype(op, "hidden", hidden, lm_head=lm_head)
    Lr, d = hidden.shape[1], hidden.shape[2]
    check_shape(op, "hidden", hidden, (B, Lr, d), "[B, Lr, d]")
    if lm_head.shape[1] != d:
        raise ValueError(f"{op}: lm_head is [V, {lm_head.shape[1]}] but hidden's width is {d}")
    return Lr, lm_head.shape[0]


def _token_ids(op: str, name: str, ids: Sequence[int], vocab: int) -> tuple[int, ...]:
    return tuple(check_op_int(op, f"{name}[{i}]", t, low=0, high=vocab - 1) for i, t in enumerate(ids))


def _num_transfer(op, x, num_transfer, start: int, Lr: int, mask_id: int) -> torch.Tensor:
    """``num_transfer`` as an index tensor ``[B]``, each ``0 <= n <=`` masked rows of its window."""
    B, dev = x.shape[0], x.device
    if isinstance(num_transfer, torch.Tensor):
        check_tensor(op, "num_transfer", num_transfer, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        check_shape(op, "num_transfer", num_transfer, (B,), "[B]")
    else:
        k = check_op_int(op, "num_transfer", num_transfer, low=0, high=Lr)
        num_transfer = torch.full((B,), k, dtype=torch.int64, device=dev)
    if value_checks_enabled():
        masked = (x[:, start : start + Lr] == mask_id).sum(dim=1)
        bad = (num_transfer < 0) | (num_transfer > masked)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: num_transfer[{b}] = {int(num_transfer[b])} but sequence {b} has "
                f"{int(masked[b])} masked positions in its window; expected 0 <= num_transfer <= that"
            )
    return num_transfer


def check_unmask_args(
    op: str,
    x,
    *,
    mask_id,
    logits,
    hidden,
    lm_head,
    start,
    num_transfer,
    threshold,
    temperature,
    remasking,
    banned_token_ids,
    deferred_token_ids,
    seed,
    generator,
) -> UnmaskArgs:
    """Every check of ``unmask_step`` (see its docstring for the rules), in the order the op has
    always made them; returns the normalised arguments."""
    check_tensor(op, "x", x, ndim=2, dtypes=(torch.int64,))
    check_has_data(op, "x", x)
    check_no_self_overlap(op, "x", x)
    L = x.shape[1]
    Lr, V = _unmask_scores_shape(op, x, logits, hidden, lm_head)
    if Lr == 0 or V == 0:
        raise ValueError(f"{op}: empty scores (Lr = {Lr}, V = {V})")
    start = check_op_int(op, "start", start, low=0, high=L - Lr)
    mask_id = check_op_int(op, "mask_id", mask_id, low=0, high=V - 1)
    banned = _token_ids(op, "banned_token_ids", banned_token_ids, V)
    deferred = _token_ids(op, "deferred_token_ids", deferred_token_ids, V)
    if len(set(banned)) == V:
        raise ValueError(f"{op}: banned_token_ids covers the whole vocabulary (V = {V}); no token is left")
    check_choice(op, "remasking", remasking, REMASKING)
    temperature = check_number(op, "temperature", temperature, low=0)
    if seed is not None and generator is not None:
        raise ValueError(f"{op}: give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(x.device).manual_seed(check_op_int(op, "seed", seed, low=0))
    if (num_transfer is None) == (threshold is None):
        raise ValueError(f"{op}: give exactly one of num_transfer and threshold")
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"{op}: threshold must be a number, got {threshold!r}")
    else:
        num_transfer = _num_transfer(op, x, num_transfer, start, Lr, mask_id)
    return UnmaskArgs(
        mask_id, start, num_transfer, threshold, temperature, remasking, banned, deferred, generator
    )
