"""``kv_append``: write new keys and values into a static KV cache, in place."""

from __future__ import annotations

import torch

from .. import _cuda, reference
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_dtype,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ._dispatch import choose_backend

OP = "kv_append"

IMPLEMENTATIONS = {"cuda": _cuda.kv_append, "reference": reference.kv_append}
AUTO_ORDER = {"cuda": ("cuda", "reference"), "cpu": ("cuda", "reference")}


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write ``T`` new keys/values per sequence into the caches at ``positions``, in place.

    Args:
        k_cache, v_cache: ``[B, Lmax, H, D]`` float16 / bfloat16 / float32, same dtype/device.
        k_new, v_new: ``[B, T, H, D]``, the caches' dtype, ``1 <= T <= Lmax``.
        positions: int32 or int64 ``[B]``: row ``b`` gets slots ``positions[b] .. +T-1``;
            ``0 <= positions[b] <= Lmax - T`` (checked unless value checks are off).
        backend: ``"cuda"`` (the ``_C`` extension: CUDA or its C++ CPU path), ``"reference"``.
    """
    check_tensor(OP, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor(OP, "v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "k_new", k_new, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "v_new", v_new, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_same_dtype(OP, "k_cache", k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    B, Lmax, H, D = k_cache.shape
    check_shape(OP, "v_cache", v_cache, k_cache.shape, "k_cache.shape")
    T = k_new.shape[1]
    check_shape(OP, "k_new", k_new, (B, T, H, D), "[B, T, H, D]")
    check_shape(OP, "v_new", v_new, k_new.shape, "k_new.shape")
    check_shape(OP, "positions", positions, (B,), "[B]")
    if T < 1 or T > Lmax:
        raise ValueError(f"{OP}: k_new has T = {T} new tokens; expected 1 <= T <= Lmax = {Lmax}")
    if value_checks_enabled():
        bad = (positions < 0) | (positions > Lmax - T)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{OP}: positions[{row}] = {int(positions[row])} with T = {T} new tokens is past "
                f"the cache (Lmax = {Lmax}); expected 0 <= positions <= {Lmax - T}"
            )
    name = choose_backend(OP, backend, dev, tuple(IMPLEMENTATIONS), AUTO_ORDER)
    IMPLEMENTATIONS[name](k_cache, v_cache, k_new, v_new, positions)
