"""Loads the compiled ``hybridkernels._C`` module and exposes its functions as torch custom ops.

``_C`` is plain pybind11 (built without torch): it takes pointers, sizes, strides, dtype codes
and the CUDA stream as integers. This module converts tensors to those arguments and
registers each function with ``torch.library.custom_op`` plus a fake implementation, so the
ops trace under ``torch.compile`` and record into CUDA graphs. Input validation happens in
``hybridkernels.ops``; ``_C`` checks again what it is given and never crashes the process.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

# Must match csrc/common.h (hk::DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
}


def available() -> bool:
    """True when ``_C`` imported (it always has the CPU implementation)."""
    return _C is not None


def build_info() -> dict:
    """``{"cuda": bool, "cuda_archs": "80;90", "cuda_runtime_version": int | None, "cxx": str}``."""
    if _C is None:
        return {"cuda": False, "cuda_archs": "", "cuda_runtime_version": None, "cxx": None}
    return dict(_C.build_info())


def has_cuda() -> bool:
    """True when ``_C`` was compiled with its CUDA kernels."""
    return build_info()["cuda"]


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``_C`` cannot run on ``device``, or None when it can."""
    if _C is None:
        return f"hybridkernels._C failed to import ({IMPORT_ERROR})"
    if device.type == "cuda" and not has_cuda():
        return "hybridkernels._C was built without CUDA (nvcc not found at install time)"
    if device.type not in ("cpu", "cuda"):
        return f"hybridkernels._C runs on cpu and cuda tensors, not {device.type}"
    return None


def _device_and_stream(t: torch.Tensor) -> tuple[int, int]:
    if t.device.type == "cuda":
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return -1, 0


@torch.library.custom_op("hybridkernels::kv_append", mutates_args=("k_cache", "v_cache"))
def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """``_C.kv_append`` on torch tensors (validated by ``hybridkernels.ops.kv_append``)."""
    device, stream = _device_and_stream(k_cache)
    _C.kv_append(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_new.data_ptr(),
        v_new.data_ptr(),
        positions.data_ptr(),
        list(k_cache.shape),
        k_new.shape[1],
        list(k_cache.stride()),
        list(v_cache.stride()),
        list(k_new.stride()),
        list(v_new.stride()),
        DTYPE_CODES[k_cache.dtype],
        DTYPE_CODES[positions.dtype],
        device,
        stream,
    )


@kv_append.register_fake
def _(k_cache, v_cache, k_new, v_new, positions) -> None:
    return None
