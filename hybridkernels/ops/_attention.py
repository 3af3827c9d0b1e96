"""``attention``: the planner's non-causal attention and the executor's causal prefill, one op
(``bidirectional_attention`` is its former name, kept as an alias)."""

from __future__ import annotations

import torch

from .. import reference
from ._checks import (
    FLOAT_DTYPES,
    HEAD_DIMS,
    check_head_dim,
    check_same_dtype,
    check_scale,
    check_shape,
    check_tensor,
    head_dim_reason,
)
from ._dispatch import OpBackends, warn_fallback

# The op's name in messages and in ``hybridkernels info`` (its name before ``attention``).
OP = "bidirectional_attention"


def _triton_attention(q, k, v, **kwargs):
    """The Triton kernel, imported on first use: ``import hybridkernels`` never imports triton."""
    from ..triton.attention import flash_attention

    return flash_attention(q, k, v, **kwargs)


# SDPA's grouped-query mode (torch >= 2.5) reads each kv head once instead of a repeated copy.
# CPU only, where it was measured: on CUDA a masked call could lose the memory-efficient kernel.
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Differentiable path (same contract): ``torch.nn.functional.scaled_dot_product_attention``,
    or the reference op when the log-sum-exp is asked for (SDPA does not return it). SDPA takes
    no block-causal mode: ``block_causal`` builds its ``[Lq, Lk]`` bool mask (this path only)."""
    if return_lse:
        return reference.bidirectional_attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            block_causal=block_causal,
            scale=scale,
            return_lse=True,
        )
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    gqa = {}
    if Hq != Hkv and _SDPA_GQA and q.device.type == "cpu":
        gqa = {"enable_gqa": True}
    elif Hq != Hkv:  # repeat the kv heads
        k = k[:, :, :, None].expand(B, Lk, Hkv, Hq // Hkv, D).reshape(B, Lk, Hq, D)
        v = v[:, :, :, None].expand(B, Lk, Hkv, Hq // Hkv, D).reshape(B, Lk, Hq, D)
    visible = None
    if block_causal is not None:
        qi = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
        kj = torch.arange(Lk, device=q.device)[None, :]
        visible = (kj // block_causal <= qi // block_causal)[None, None]
    elif causal and (Lq != Lk or key_padding_mask is not None):
        qi = torch.arange(Lq, device=q.device)[:, None]
        visible = (torch.arange(Lk, device=q.device)[None, :] <= qi + (Lk - Lq))[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        visible = pad if visible is None else visible & pad
    seen = None
    if key_padding_mask is not None:  # rows with no visible key: attend anything, then zero them
        seen = visible.any(-1, keepdim=True)
        visible = visible | ~seen
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible,
        is_causal=causal and block_causal is None and visible is None,
        scale=scale,
        **gqa,
    )
    if seen is not None:
        out = out * seen
    return out.transpose(1, 2)


DISPATCH = OpBackends(
    OP,
    {"triton": _triton_attention, "reference": reference.bidirectional_attention},
    {"cuda": ("triton", "reference"), "cpu": ("reference",)},
)
IMPLEMENTATIONS, AUTO_ORDER = DISPATCH.implementations, DISPATCH.auto_order


def sdpa_instead_of_reference(device: torch.device, backend: str | None) -> bool:
    """Whether a cache hook on ``device`` should call :func:`sdpa_attention` directly: on the
    CPU, when no backend is named and the automatic choice is the reference (the spec, written
    for clarity: einsum, masks, an explicit log-sum-exp), torch's fused SDPA kernel has the same
    contract and is 4-10x faster for a prefill or a planner's window."""
    device = torch.device(device)
    return device.type == "cpu" and backend is None and DISPATCH.resolve(None, device) == ("reference", None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Multi-head softmax attention, all keys visible (the planner) or causal (a prefill),
    flash-attn layout.

    The Triton kernel is forward-only (inference). When autograd is recording and q, k or v
    requires grad, a non-reference backend is replaced by :func:`sdpa_attention`
    (``torch.nn.functional.scaled_dot_product_attention``; the reference op when ``return_lse``),
    so gradients flow, e.g. through the executor while training the projector.

    Args:
        q: ``[B, Lq, Hq, D]`` float16 / bfloat16 / float32, last dim contiguous.
        k, v: ``[B, Lk, Hkv, D]``, same dtype and device, ``Hq % Hkv == 0`` (GQA), ``Lq <= Lk``.
            Any ``D >= 1``; the Triton kernels cover ``D`` in {32, 64, 96, 128, 256}, and other
            head dims run the reference (torch SDPA on a GPU) with a one-time warning.
        key_padding_mask: optional bool ``[B, Lk]``, True = attend (left-padded batches).
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (queries aligned to the end).
        block_causal: block size ``b`` of block-diffusion attention (SDAR, Fast-dLLM v2): keys
            are cut into blocks of ``b`` from key 0; query ``i``, at key position
            ``p = i + Lk - Lq`` (aligned to the end, as ``causal``), sees the keys ``j`` with
            ``j // b <= p // b``: causal across blocks, bidirectional inside one. No mask tensor
            is built (the Triton kernel skips the key tiles no row of a program sees). A prompt
            is blocks like the rest (both models prefill it that way). With left-padded rows the
            grid is by key index, not by each row's positions: align the rows first. Not with
            ``causal=True`` (``block_causal=1`` is causal).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq, Lq]`` float32, to merge partial
            attentions. Query rows that see no key give output 0 and lse ``-inf``.
        backend: ``"triton"``, ``"reference"`` or None (``HYBRIDKERNELS_BACKEND``, then auto).

    Returns ``out [B, Lq, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    check_tensor(OP, "q", q, ndim=4, dtypes=FLOAT_DTYPES, contiguous_last=True)
    check_tensor(OP, "k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device, contiguous_last=True)
    check_tensor(OP, "v", v, ndim=4, dtypes=FLOAT_DTYPES, device=q.device, contiguous_last=True)
    check_same_dtype(OP, "q", q, k=k, v=v)
    B, Lq, Hq, D = q.shape
    check_shape(OP, "v", v, k.shape, "k.shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"{OP}: k must be [B, Lk, Hkv, D] = [{B}, Lk, Hkv, {D}] to match q, got {tuple(k.shape)}"
        )
    Lk, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{OP}: q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) (GQA)")
    check_head_dim(OP, D)
    if Lq == 0 or Lk == 0 or B == 0:
        raise ValueError(f"{OP}: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if Lq > Lk:
        raise ValueError(f"{OP}: Lq ({Lq}) must be <= Lk ({Lk})")
    if key_padding_mask is not None:
        check_tensor(OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=q.device)
        check_shape(OP, "key_padding_mask", key_padding_mask, (B, Lk), "[B, Lk]")
    check_scale(OP, scale)
    block_causal = _check_block_causal(block_causal, causal)

    triton_reason = head_dim_reason("the Triton attention kernels", D, HEAD_DIMS)
    name, fallback = DISPATCH.resolve(backend, q.device, {"triton": triton_reason})
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    impl = sdpa_attention if needs_grad and name != "reference" else IMPLEMENTATIONS[name]
    if fallback is not None:
        running = name
        if name == "reference" and q.device.type == "cuda":  # a kernel's head dim: SDPA is faster
            impl, running = sdpa_attention, "torch SDPA"
        warn_fallback(OP, fallback[0], fallback[1], running)
    return impl(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        block_causal=block_causal,
        scale=scale,
        return_lse=return_lse,
    )


def _check_block_causal(block_causal, causal) -> int | None:
    """``block_causal`` is None or an int >= 1, and not combined with ``causal=True``."""
    if block_causal is None:
        return None
    if isinstance(block_causal, bool) or not isinstance(block_causal, int) or block_causal < 1:
        raise ValueError(f"{OP}: block_causal must be None or a block size >= 1, got {block_causal!r}")
    if causal:
        raise ValueError(f"{OP}: give causal=True or block_causal, not both (block_causal=1 is causal)")
    return int(block_causal)


bidirectional_attention = attention  # the former name
