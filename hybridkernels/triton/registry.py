"""One registry of the Triton kernels' compile signatures, walked by the compile check.

A kernel module declares, next to its kernel, a function yielding :class:`CompileCase` s (one per
autotune configuration x dtype x other compile-time variant) and decorates it with
:func:`compile_cases`. The check imports every module of ``hybridkernels.triton`` and compiles each
case for sm_80 and sm_90 without a GPU. This module itself does not import triton.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

_PROVIDERS: list[Callable[[], Iterable[CompileCase]]] = []


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One ahead-of-time compilation of a ``@triton.jit`` function.

    kernel: the ``triton.jit`` function itself (not an ``Autotuner`` wrapper).
    signature: argument name -> Triton type (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*i64"``,
        ``"i32"``, ``"i64"``, ``"fp32"``), or ``"constexpr"`` for compile-time arguments.
    constexprs: compile-time argument name -> value (block sizes, flags).
    num_warps, num_stages: launch configuration, as in ``triton.Config``.
    name: a readable label: kernel, dtype and config (it appears in failure messages).
    hopper_features: what the sm_90 build should contain, e.g. ``("wgmma",)``.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    name: str
    hopper_features: tuple[str, ...] = ()


def compile_cases(provider: Callable[[], Iterable[CompileCase]]):
    """Decorator: register ``provider`` (a zero-argument function yielding CompileCases)."""
    _PROVIDERS.append(provider)
    return provider


def all_compile_cases() -> list[CompileCase]:
    """Import every kernel module of ``hybridkernels.triton`` and collect their cases."""
    import importlib
    import pkgutil

    from hybridkernels import triton as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")
    return [case for provider in _PROVIDERS for case in provider()]
