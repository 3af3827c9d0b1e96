"""Plain-torch definition of the KV-cache write."""

from __future__ import annotations

import torch


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write ``T`` new keys/values per row into the caches, in place.

    caches ``[B, Lmax, H, D]``, ``k_new``/``v_new`` ``[B, T, H, D]``, ``positions`` int
    ``[B]``: row ``b`` gets ``cache[b, positions[b] + t] = new[b, t]`` for ``t < T``.
    """
    T = k_new.shape[1]
    slots = positions.to(device=k_cache.device, dtype=torch.long)[:, None] + torch.arange(
        T, device=k_cache.device
    )
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)[:, None]
    k_cache[rows, slots] = k_new.to(k_cache.dtype)
    v_cache[rows, slots] = v_new.to(v_cache.dtype)
