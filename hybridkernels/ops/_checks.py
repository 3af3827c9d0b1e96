"""Argument checks shared by the ops. Errors name the argument and what was expected."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
HEAD_DIMS = (32, 64, 96, 128, 256)
_VALUE_CHECKS = contextvars.ContextVar("hybridkernels_value_checks", default=True)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous_last: bool = False,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{op}: {name} must have dtype in ({_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (like the other inputs)")
    if contiguous_last and t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(
            f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
            f"{tuple(t.stride())}; call .contiguous()"
        )


def check_same_dtype(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                "they must match"
            )


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_head_dim(op: str, d: int, supported=HEAD_DIMS) -> None:
    if d not in supported:
        raise ValueError(f"{op}: head_dim {d} is not supported (supported: {supported})")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if low is not None and value < low or high is not None and value > high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{op}: {name} = {value} is outside [{lo}, {hi}]")
    return value


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
