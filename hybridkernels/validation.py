"""The argument checks of every layer: one place, one wording.

Each checker takes ``where`` (the public function or class, e.g. ``"ARExecutor.generate"``; ``""``
for none) and the argument's ``name``, and raises ``TypeError`` (wrong kind of object) or
``ValueError`` (wrong value, shape or device) with a message that starts ``"{where}: {name}"``.
Checkers that normalise return the value to use. Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- plain values
def check_int(
    where: str,
    name: str,
    value,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_tensor: bool = False,
) -> int:
    """An ``int`` (not a bool; with ``allow_tensor`` also a one-element integer tensor) in
    ``[low, high]``. ``TypeError`` for the wrong kind, ``ValueError`` out of bounds."""
    if not _is_int(value):
        if (
            allow_tensor
            and isinstance(value, torch.Tensor)
            and value.numel() == 1
            and not value.is_floating_point()
        ):
            value = int(value)
        else:
            raise TypeError(f"{_at(where)}{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            raise ValueError(f"{_at(where)}{name} = {value} is outside [{low}, {high}]")
        bound = f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{_at(where)}{name} must be {bound}, got {value}")
    return value


def check_int_at_least(where: str, name: str, value, low: int = 1) -> int:
    """An ``int >= low``, for sizes and counts of option objects: ``ValueError`` for anything
    else, wrong kinds included ("must be a positive int" when ``low == 1``)."""
    if not _is_int(value) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{_at(where)}{name} must be {what}, got {value!r}")
    return value


def check_positive_int(where: str, name: str, value) -> int:
    """``check_int_at_least(where, name, value, 1)``."""
    return check_int_at_least(where, name, value, 1)


def check_number(where: str, name: str, value, *, low: float | None = None) -> float:
    """A finite real number (int or float, not a bool), ``>= low`` when given; ``ValueError``
    otherwise. Returns it as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{_at(where)}{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_bool(where: str, name: str, value) -> bool:
    """``True`` or ``False`` (``TypeError`` for anything else, 0/1 included)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_at(where)}{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(where: str, name: str, value, choices: Sequence):
    """``value`` is one of ``choices`` (``ValueError`` naming them)."""
    if value not in tuple(choices):
        raise ValueError(f"{_at(where)}{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def renamed(where: str, name: str, value, old_name: str, old_value):
    """The value of an argument that was renamed: ``value``, or the deprecated ``old_name``'s
    ``old_value`` when only that one is given (``ValueError`` when both are, differently)."""
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise ValueError(f"{_at(where)}give {name} or its former name {old_name}, not both")
    return old_value


# --------------------------------------------------------------------------- tensors
def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    where: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous_last: bool = False,
) -> None:
    """A tensor with ``ndim`` dims, a dtype in ``dtypes``, on ``device``, optionally with a
    contiguous last dimension (what kernels read with stride 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_at(where)}{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{_at(where)}{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{_at(where)}{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{_at(where)}{name} is on {t.device}, expected {device} (like the other inputs)")
    if contiguous_last and t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(
            f"{_at(where)}{name} must have a contiguous last dimension (stride 1), got strides "
            f"{tuple(t.stride())}; call .contiguous()"
        )


def check_same_dtype(where: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None skipped) has ``reference``'s dtype."""
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(
                f"{_at(where)}{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                "they must match"
            )


def check_shape(where: str, name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    """``t.shape == expected``; ``meaning`` spells the expected shape, e.g. ``"[B, Lk]"``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{_at(where)}{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}"
        )


def check_token_ids(where: str, name: str, ids, *, vocab_size: int | None = None) -> None:
    """``ids`` is a non-empty integer ``[B, L]`` tensor, with values in ``[0, vocab_size)`` when
    ``vocab_size`` is given (that check syncs with the device)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{_at(where)}{name} must be a [B, L] tensor, got {got}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{_at(where)}{name} must hold integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{_at(where)}empty {name} (shape {tuple(ids.shape)})")
    if vocab_size is not None and bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(
            f"{_at(where)}{name} must hold token ids in [0, {vocab_size}), got "
            f"{int(ids.min())}..{int(ids.max())}"
        )


def check_attention_mask(
    where: str,
    attention_mask,
    shape: Sequence[int],
    device: torch.device,
    *,
    like: str | None = None,
    binary: bool = False,
    left_padded: bool = False,
) -> torch.Tensor:
    """A ``[B, L]`` padding mask (True / nonzero = real token) of ``shape`` on ``device``;
    returns it as bool.

    ``like``: the tensor the mask goes with (``"prompt_ids"``): errors say "must have
    prompt_ids' shape" (else "must be [B, L] = ..."). ``binary``: values must be 0/1 (or bool).
    ``left_padded``: every row is zeros then ones, and no row is all padding.
    """
    shape = tuple(shape)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
        got = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        want = f"have {like}' shape {shape}" if like else f"be [B, L] = {list(shape)}"
        raise ValueError(f"{_at(where)}attention_mask must {want}, got {got}")
    if attention_mask.device != device:
        raise ValueError(
            f"{_at(where)}attention_mask is on {attention_mask.device}, {like or 'inputs'} on {device}"
        )
    if attention_mask.dtype == torch.bool:
        valid = attention_mask
    else:
        if binary and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{_at(where)}attention_mask must hold 0/1 (or bool) values")
        valid = attention_mask != 0
    if left_padded:
        empty = ~valid.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"{_at(where)}prompt row {int(empty.nonzero()[0])} is empty (all padding)")
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError(f"{_at(where)}attention_mask must be left padding (zeros, then ones, per row)")
    return valid


__all__ = [
    "check_attention_mask",
    "check_bool",
    "check_choice",
    "check_int",
    "check_int_at_least",
    "check_number",
    "check_positive_int",
    "check_same_dtype",
    "check_shape",
    "check_tensor",
    "check_token_ids",
    "renamed",
]
