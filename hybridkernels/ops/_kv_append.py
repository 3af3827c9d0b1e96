"""``kv_append``: write new keys and values into a static KV cache, in place."""

from __future__ import annotations

import torch

from .. import _cuda, reference
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_has_data,
    check_no_self_overlap,
    check_same_dtype,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ._dispatch import OpBackends

OP = "kv_append"

DISPATCH = OpBackends(
    OP,
    {"cuda": _cuda.kv_append, "reference": reference.kv_append},
    {"cuda": ("cuda", "reference"), "cpu": ("cuda", "reference")},
)
IMPLEMENTATIONS, AUTO_ORDER = DISPATCH.implementations, DISPATCH.auto_order


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Write ``T`` new keys/values per sequence into the caches at ``positions``, in place,
    optionally rotating the keys (RoPE) on the way.

    Args:
        k_cache, v_cache: ``[B, Lmax, H, D]`` float16 / bfloat16 / float32, same dtype/device.
        k_new, v_new: ``[B, T, H, D]``, the caches' dtype, ``1 <= T <= Lmax``.
        positions: int32 or int64 ``[B]``: row ``b`` gets slots ``positions[b] .. +T-1``;
            ``0 <= positions[b] <= Lmax - T`` (checked unless value checks are off).
        rope: optional ``(cos, sin)`` float32 tables ``[P, D/2]``, or ``[P, D]`` in HF's layout
            (``cat(freqs, freqs)``; only the first ``D/2`` columns are read), contiguous rows,
            ``D`` even. Keys are rotated rotate-half style (HF Llama / Qwen), in float32 and
            rounded once to the cache dtype; with ``half = D/2``, ``i < half`` and ``p`` the
            token's rotary position::

                k[i]        = k[i] * cos[p, i] - k[i + half] * sin[p, i]
                k[i + half] = k[i + half] * cos[p, i] + k[i] * sin[p, i]

            Values are copied unchanged.
        rope_positions: int32 / int64 ``[B]`` (token ``t`` of row ``b`` is at rotary position
            ``rope_positions[b] + t``) or ``[B, T]`` (per token, e.g. left-padded prefill);
            default ``positions`` (rotary position = cache slot). Every position must be a row
            of the tables: ``0 <= p < P``.
        backend: ``"cuda"`` (the ``_C`` extension: CUDA or its C++ CPU path), ``"reference"``.
    """
    check_tensor(OP, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_has_data(OP, "k_cache", k_cache)
    dev = k_cache.device
    check_tensor(OP, "v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "k_new", k_new, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "v_new", v_new, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_same_dtype(OP, "k_cache", k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    check_no_self_overlap(OP, "k_cache", k_cache)
    check_no_self_overlap(OP, "v_cache", v_cache)
    B, Lmax, H, D = k_cache.shape
    check_shape(OP, "v_cache", v_cache, k_cache.shape, "k_cache.shape")
    T = k_new.shape[1]
    check_shape(OP, "k_new", k_new, (B, T, H, D), "[B, T, H, D]")
    check_shape(OP, "v_new", v_new, k_new.shape, "k_new.shape")
    check_shape(OP, "positions", positions, (B,), "[B]")
    if T < 1 or T > Lmax:
        raise ValueError(f"{OP}: k_new has T = {T} new tokens; expected 1 <= T <= Lmax = {Lmax}")
    if rope is not None:
        rope = _check_rope(rope, D, dev)
        if rope_positions is not None:
            check_tensor(OP, "rope_positions", rope_positions, dtypes=INDEX_DTYPES, device=dev)
            if tuple(rope_positions.shape) not in ((B,), (B, T)):
                raise ValueError(
                    f"{OP}: rope_positions must have shape [B] = ({B},) or [B, T] = ({B}, {T}), "
                    f"got {tuple(rope_positions.shape)}"
                )
    elif rope_positions is not None:
        raise ValueError(f"{OP}: rope_positions is given but rope (cos, sin) is not")
    if value_checks_enabled():
        bad = (positions < 0) | (positions > Lmax - T)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{OP}: positions[{row}] = {int(positions[row])} with T = {T} new tokens is past "
                f"the cache (Lmax = {Lmax}); expected 0 <= positions <= {Lmax - T}"
            )
        if rope is not None:
            _check_rope_positions(
                positions if rope_positions is None else rope_positions, T, rope[0].shape[0]
            )
    name = DISPATCH.choose(backend, dev)
    if rope is None:
        IMPLEMENTATIONS[name](k_cache, v_cache, k_new, v_new, positions)
    else:
        IMPLEMENTATIONS[name](
            k_cache, v_cache, k_new, v_new, positions, rope=rope, rope_positions=rope_positions
        )


def _check_rope(rope, D: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        raise TypeError(f"{OP}: rope must be a tuple (cos, sin) of float32 tables")
    cos, sin = rope
    for name, t in (("rope cos", cos), ("rope sin", sin)):
        check_tensor(OP, name, t, ndim=2, dtypes=(torch.float32,), device=dev, contiguous_last=True)
    if D % 2:
        raise ValueError(f"{OP}: RoPE needs an even head_dim, got {D}")
    if cos.shape[1] not in (D // 2, D) or cos.shape[0] < 1:
        raise ValueError(
            f"{OP}: rope cos must have shape [P, D/2] = [P, {D // 2}] or [P, D] = [P, {D}], "
            f"got {tuple(cos.shape)}"
        )
    check_shape(OP, "rope sin", sin, cos.shape, "rope cos's shape")
    if sin.stride(0) != cos.stride(0):
        raise ValueError(
            f"{OP}: rope cos and sin must have the same row stride, got {cos.stride(0)} and "
            f"{sin.stride(0)}; call .contiguous()"
        )
    return cos, sin


def _check_rope_positions(rope_positions: torch.Tensor, T: int, P: int) -> None:
    pos = rope_positions.long()
    # [B] start positions: the last token is at pos + T - 1; compare against P - T instead of
    # adding, which would overflow int64 for positions near 2^63.
    last_start = P - T if pos.dim() == 1 else P - 1
    bad = (pos < 0) | (pos > last_start)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{OP}: rotary position {int(pos[idx])} at rope_positions{list(idx)} with T = {T} new "
            f"tokens is outside the RoPE tables' {P} rows; expected 0 <= position <= "
            f"{P - T if pos.dim() == 1 else P - 1}"
        )
