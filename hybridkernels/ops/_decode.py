"""``decode_attention``: one new query per sequence over a static KV cache (+ shared prefix)."""

from __future__ import annotations

import torch

from .. import _cuda, reference
from ._checks import (
    FLOAT_DTYPES,
    check_has_data,
    check_head_dim,
    check_op_int,
    check_same_dtype,
    check_scale,
    check_shape,
    check_tensor,
    head_dim_reason,
    value_checks_enabled,
)
from ._dispatch import OpBackends

OP = "decode_attention"

DISPATCH = OpBackends(
    OP,
    {"cuda": _cuda.decode_attention, "reference": reference.decode_attention},
    {"cuda": ("cuda", "reference"), "cpu": ("cuda", "reference")},
)
IMPLEMENTATIONS, AUTO_ORDER = DISPATCH.implementations, DISPATCH.auto_order
CUDA_HEAD_DIMS = (64, 128)


def compiled_reason(D: int, tensors: list[torch.Tensor]) -> str | None:
    """Why the ``_C`` kernels cannot take these inputs (``tensors``: q, the caches, the prefix;
    head dim, empty inputs, 16-byte rows on a GPU), or None: the dispatch's ``extra_reasons``."""
    if any(t.numel() == 0 for t in tensors[:3]):
        return "empty batch or cache"
    why = head_dim_reason("the compiled decode kernels", D, CUDA_HEAD_DIMS)
    if why is not None:
        return why
    for t in tensors:
        if t.device.type != "cuda":
            continue
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return (
                "the CUDA decode kernel loads 16-byte vectors: data pointers and outer strides of "
                "q, caches and prefix must be multiples of 16 bytes"
            )
    return None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention of one query per sequence over its cache, split over the sequence (split-KV).

    Args:
        q: ``[B, Hq, D]`` float16 / bfloat16 / float32, last dim contiguous.
        k_cache, v_cache: ``[B, Lmax, Hkv, D]``, q's dtype and device, ``Hq % Hkv == 0``.
        cache_lens: int32 ``[B]``: row ``b`` attends its first ``cache_lens[b]`` slots,
            ``0 <= cache_lens[b] <= Lmax``; 0 only when a non-empty prefix is given.
        prefix: optional ``(k_prefix, v_prefix, prefix_len)`` with ``[Lp, Hkv, D]`` tensors and
            ``0 <= prefix_len <= Lp``: keys every row attends before its own (cascade).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq]`` float32.
        backend: ``"cuda"`` (the ``_C`` extension: CUDA kernels on a GPU, its C++ path on the
            CPU; ``D`` in {64, 128}), ``"reference"`` (any ``D``) or None (env, then auto; other
            head dims run the reference, with a one-time warning).

    Returns ``out [B, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    check_tensor(OP, "q", q, ndim=3, dtypes=FLOAT_DTYPES, contiguous_last=True)
    check_has_data(OP, "q", q)
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(OP, name, t, ndim=4, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
    check_same_dtype(OP, "q", q, k_cache=k_cache, v_cache=v_cache)
    check_tensor(OP, "cache_lens", cache_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    B, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    check_shape(OP, "k_cache", k_cache, (B, Lmax, Hkv, D), "[B, Lmax, Hkv, D]")
    check_shape(OP, "v_cache", v_cache, k_cache.shape, "k_cache.shape")
    check_shape(OP, "cache_lens", cache_lens, (B,), "[B]")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{OP}: q heads ({Hq}) must be a multiple of cache heads ({Hkv}) (GQA)")
    check_head_dim(OP, D)
    check_scale(OP, scale)

    prefix_len = 0
    if prefix is not None:
        if not (isinstance(prefix, (tuple, list)) and len(prefix) == 3):
            raise TypeError(f"{OP}: prefix must be a tuple (k_prefix, v_prefix, prefix_len)")
        kp, vp, prefix_len = prefix
        for name, t in (("prefix k", kp), ("prefix v", vp)):
            check_tensor(OP, name, t, ndim=3, dtypes=FLOAT_DTYPES, device=dev, contiguous_last=True)
        check_same_dtype(OP, "q", q, prefix_k=kp, prefix_v=vp)
        check_shape(OP, "prefix k", kp, (kp.shape[0], Hkv, D), "[Lp, Hkv, D]")
        check_shape(OP, "prefix v", vp, kp.shape, "prefix k's shape")
        prefix_len = check_op_int(OP, "prefix_len", prefix_len, low=0, high=kp.shape[0])
        prefix = (kp, vp, prefix_len)

    if value_checks_enabled():
        low = 0 if prefix_len > 0 else 1
        bad = (cache_lens < low) | (cache_lens > Lmax)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{OP}: cache_lens[{row}] = {int(cache_lens[row])}; expected {low} <= cache_lens "
                f"<= Lmax = {Lmax}" + ("" if prefix_len else " (a row must attend at least one key)")
            )
    tensors = [q, k_cache, v_cache] + ([prefix[0], prefix[1]] if prefix_len else [])
    name = DISPATCH.choose(backend, dev, {"cuda": compiled_reason(D, tensors)})
    return IMPLEMENTATIONS[name](
        q, k_cache, v_cache, cache_lens, scale=scale, prefix=prefix, return_lse=return_lse
    )
