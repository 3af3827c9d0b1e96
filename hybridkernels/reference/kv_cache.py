"""Plain-torch definition of the KV-cache write (with optional fused RoPE)."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF Llama / Qwen convention) in float32.

    ``x [..., D]``; ``cos``/``sin`` ``[..., D/2]`` (broadcast against ``x[..., :D/2]``). With
    ``half = D / 2`` and ``i < half``::

        out[i]        = x[i] * cos[i] - x[i + half] * sin[i]
        out[i + half] = x[i + half] * cos[i] + x[i] * sin[i]

    which is HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``. Returns float32.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos.float(), sin.float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_rows(
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    T: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin rows ``[B, T, 1, D/2]`` for start positions ``[B]`` (token ``t`` at
    ``positions[b] + t``) or per-token positions ``[B, T]``; tables ``[P, D/2]`` or ``[P, D]``
    (only the first ``D/2`` columns are read)."""
    cos, sin = rope
    pos = positions.to(device=cos.device, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos[:, None] + torch.arange(T, device=cos.device)
    half = head_dim // 2
    return cos[pos, None, :half].float(), sin[pos, None, :half].float()


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_positions: torch.Tensor | None = None,
) -> None:
    """Write ``T`` new keys/values per row into the caches, in place.

    caches ``[B, Lmax, H, D]``, ``k_new``/``v_new`` ``[B, T, H, D]``, ``positions`` int
    ``[B]``: row ``b`` gets ``cache[b, positions[b] + t] = new[b, t]`` for ``t < T``.

    ``rope = (cos, sin)`` float32 tables ``[P, D/2]`` (or ``[P, D]`` in HF's duplicated layout,
    first half read): keys are rotated by :func:`apply_rotary` at rotary position
    ``rope_positions[b] + t`` (``rope_positions`` int ``[B]``, default ``positions``) or
    ``rope_positions[b, t]`` (``[B, T]``), in float32, then rounded once to the cache dtype.
    Values are copied unchanged.
    """
    T = k_new.shape[1]
    slots = positions.to(device=k_cache.device, dtype=torch.long)[:, None] + torch.arange(
        T, device=k_cache.device
    )
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)[:, None]
    if rope is not None:
        cos, sin = rope_rows(
            rope, positions if rope_positions is None else rope_positions, T, k_new.shape[-1]
        )
        k_new = apply_rotary(k_new, cos, sin)
    k_cache[rows, slots] = k_new.to(k_cache.dtype)
    v_cache[rows, slots] = v_new.to(v_cache.dtype)
