"""Backend choice for the ops: ``backend=`` argument, then ``HYBRIDKERNELS_BACKEND``, then auto.

Backends: ``triton`` (Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` (the compiled ``_C`` extension: CUDA kernels on CUDA tensors, its C++ implementation on
CPU tensors), ``reference`` (plain torch, everywhere). Auto picks the first usable backend of the
op's preference order for the tensors' device. An op that does not implement the backend named
by ``HYBRIDKERNELS_BACKEND`` ignores it (the variable is global); ``backend=`` is strict.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from ..common import triton_interpreting

BACKENDS = ("triton", "cuda", "reference")
ENV_VAR = "HYBRIDKERNELS_BACKEND"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    return (
        f"the triton backend needs CUDA tensors (got {device.type}); "
        "set TRITON_INTERPRET=1 before importing triton to run it on the CPU interpreter"
    )


def cuda_ext_unavailable_reason(device: torch.device) -> str | None:
    from .. import _cuda

    return _cuda.unavailable_reason(device)


REASONS: Mapping[str, Callable[[torch.device], str | None]] = {
    "triton": triton_unavailable_reason,
    "cuda": cuda_ext_unavailable_reason,
    "reference": lambda device: None,
}


def resolve_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    implemented: Sequence[str],
    auto_order: Mapping[str, Sequence[str]],
    extra_reasons: Mapping[str, str | None] | None = None,
) -> tuple[str, tuple[str, str] | None]:
    """``(name, fallback)``: the backend that runs ``op`` on ``device``, and ``(backend, reason)``
    when these particular inputs (``extra_reasons``, e.g. a head dim the kernels do not cover)
    made the choice fall past a backend that would otherwise have run, else None.

    ``implemented``: backends the op has; ``auto_order``: device type -> preference order;
    ``extra_reasons``: backend -> why it cannot take these particular inputs. ``backend=`` is
    strict (a backend that cannot take the inputs raises); ``HYBRIDKERNELS_BACKEND`` is global,
    so a backend it names that cannot take these inputs falls back to the automatic choice.
    """
    from_env = requested is None
    name = (requested if requested is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in (*BACKENDS, "auto"):
        source = f"{ENV_VAR}={name!r}" if from_env else f"backend={name!r}"
        raise ValueError(f"{op}: {source} is not one of {('auto', *BACKENDS)}")
    extra = extra_reasons or {}

    def device_reason(b: str) -> str | None:
        if b not in implemented:
            return f"{op} has no {b} implementation (it has: {', '.join(implemented)})"
        return REASONS[b](device)

    fallback = None
    if name != "auto" and not (from_env and name not in implemented):
        why = device_reason(name) or extra.get(name)
        if why is None:
            return name, None
        if not from_env or device_reason(name) is not None:
            source = f"{ENV_VAR}={name}" if from_env else f"backend={name!r}"
            raise ValueError(f"{op}: {source} cannot run these inputs: {why}")
        fallback = (name, why)
    order = auto_order.get(device.type, ("reference",))
    for b in order:
        if b not in implemented or device_reason(b) is not None:
            continue
        why = extra.get(b)
        if why is None:
            return b, fallback
        fallback = fallback or (b, why)
    return "reference", fallback


_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def warn_fallback(op: str, skipped: str, reason: str, running: str) -> None:
    """One ``RuntimeWarning`` per ``(op, reason)``: ``op`` runs ``running`` instead of the
    ``skipped`` backend, which cannot take these inputs for ``reason``."""
    with _WARNED_LOCK:
        if (op, reason) in _WARNED:
            return
        _WARNED.add((op, reason))
    warnings.warn(
        f"{op}: {reason}; running the {running} instead of the {skipped} backend "
        "(shown once per op and reason)",
        RuntimeWarning,
        stacklevel=4,
    )


def choose_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    implemented: Sequence[str],
    auto_order: Mapping[str, Sequence[str]],
    extra_reasons: Mapping[str, str | None] | None = None,
    *,
    warn: bool = True,
) -> str:
    """Name of the backend that runs ``op`` on ``device`` (see :func:`resolve_backend`); when the
    inputs made it fall back, a one-time warning says so (``warn``)."""
    name, fallback = resolve_backend(op, requested, device, implemented, auto_order, extra_reasons)
    if fallback is not None and warn:
        warn_fallback(op, fallback[0], fallback[1], name)
    return name


@dataclasses.dataclass(frozen=True)
class OpBackends:
    """One op's backends: ``implementations`` (backend name -> function with the reference's
    signature; a plain dict, so a test can swap an entry) and ``auto_order`` (device type ->
    preference order of the automatic choice)."""

    op: str
    implementations: dict[str, Callable]
    auto_order: Mapping[str, Sequence[str]]

    def choose(
        self,
        requested: str | None,
        device: torch.device,
        extra_reasons: Mapping[str, str | None] | None = None,
        *,
        warn: bool = True,
    ) -> str:
        """:func:`choose_backend` for this op."""
        return choose_backend(
            self.op, requested, device, tuple(self.implementations), self.auto_order, extra_reasons, warn=warn
        )

    def resolve(
        self,
        requested: str | None,
        device: torch.device,
        extra_reasons: Mapping[str, str | None] | None = None,
    ) -> tuple[str, tuple[str, str] | None]:
        """:func:`resolve_backend` for this op (no warning)."""
        return resolve_backend(
            self.op, requested, device, tuple(self.implementations), self.auto_order, extra_reasons
        )


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OpBackends",
    "choose_backend",
    "resolve_backend",
    "triton_interpreting",
    "triton_unavailable_reason",
    "warn_fallback",
]
