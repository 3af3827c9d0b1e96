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


def choose_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    implemented: Sequence[str],
    auto_order: Mapping[str, Sequence[str]],
    extra_reasons: Mapping[str, str | None] | None = None,
) -> str:
    """Name of the backend that runs ``op`` on ``device``.

    ``implemented``: backends the op has; ``auto_order``: device type -> preference order;
    ``extra_reasons``: backend -> why it cannot take these particular inputs (e.g. a head dim).
    """
    from_env = requested is None
    name = (requested if requested is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in (*BACKENDS, "auto"):
        source = f"{ENV_VAR}={name!r}" if from_env else f"backend={name!r}"
        raise ValueError(f"{op}: {source} is not one of {('auto', *BACKENDS)}")

    def reason(b: str) -> str | None:
        if b not in implemented:
            return f"{op} has no {b} implementation (it has: {', '.join(implemented)})"
        return REASONS[b](device) or (extra_reasons or {}).get(b)

    if name != "auto" and not (from_env and name not in implemented):
        why = reason(name)
        if why is not None:
            source = f"{ENV_VAR}={name}" if from_env else f"backend={name!r}"
            raise ValueError(f"{op}: {source} cannot run these inputs: {why}")
        return name
    order = auto_order.get(device.type, ("reference",))
    for b in order:
        if b in implemented and reason(b) is None:
            return b
    return "reference"


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
    ) -> str:
        """:func:`choose_backend` for this op."""
        return choose_backend(
            self.op, requested, device, tuple(self.implementations), self.auto_order, extra_reasons
        )


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OpBackends",
    "choose_backend",
    "triton_interpreting",
    "triton_unavailable_reason",
]
