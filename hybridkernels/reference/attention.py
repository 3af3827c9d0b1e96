"""Plain-torch definitions of the attention ops: the spec the kernels are tested against.

Written for clarity, not speed: K/V heads are repeated for GQA, masks are
materialised, and everything accumulates in float32.
"""

from __future__ import annotations

import math

import torch


def _repeat_kv(x: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Repeat each KV head ``n_rep`` times along ``head_dim`` (GQA -> MHA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=head_dim)


def bidirectional_attention(
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
    """Softmax attention over all keys (or causally, queries aligned to the end of the keys).

    q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]`` with ``Hq % Hkv == 0`` and ``Lq <= Lk``;
    ``key_padding_mask`` bool ``[B, Lk]``, True = attend. With ``causal=True`` query ``i``
    sees keys ``j <= i + Lk - Lq``. With ``block_causal=b`` (block diffusion: SDAR, Fast-dLLM v2)
    the keys are cut into blocks of ``b`` from key 0 and query ``i`` (at key position
    ``p = i + Lk - Lq``) sees every key of its own block and of the blocks before it:
    ``j // b <= p // b``. The prompt is no special region: it is blocks like the generation, as
    both models' samplers prefill it (block-causal over the first ``P // b * b`` tokens, its tail
    in the first generated block). A query row that sees no key gets output 0 and log-sum-exp
    ``-inf``.

    Returns ``out [B, Lq, Hq, D]`` in q's dtype, and with ``return_lse`` also
    ``lse [B, Hq, Lq]`` float32 (natural log of the sum of ``exp(scale * q.k)``).
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = _repeat_kv(k.float(), Hq // Hkv, 2)
    vf = _repeat_kv(v.float(), Hq // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale

    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
        # Padded slots may hold anything (an uninitialised cache: NaN); 0 * NaN would leak.
        kf = kf.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
        vf = vf.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    if causal or block_causal is not None:
        qi = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
        kj = torch.arange(Lk, device=q.device)[None, :]
        if block_causal is not None:
            visible = visible & (kj // block_causal <= qi // block_causal)
        else:
            visible = visible & (kj <= qi)
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Lq]; -inf where nothing is visible
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    probs = probs.masked_fill(~visible, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)
    return (out, lse) if return_lse else out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    return_lse: bool = False,
):
    """One query per sequence against its cached keys, optionally after a shared prefix.

    q ``[B, Hq, D]``; caches ``[B, Lmax, Hkv, D]``; ``cache_lens`` int ``[B]``: row ``b``
    attends ``k_cache[b, :cache_lens[b]]``. ``prefix = (k_prefix, v_prefix, prefix_len)``
    with ``k_prefix``/``v_prefix`` ``[Lp, Hkv, D]``: the first ``prefix_len`` of them are
    attended by every row, before its own keys (a cascade: one copy serves the batch).

    Returns ``out [B, Hq, D]`` in q's dtype (and ``lse [B, Hq]`` float32 with ``return_lse``).
    """
    B, Hq, D = q.shape
    Lmax = k_cache.shape[1]
    lens = cache_lens.to(device=q.device, dtype=torch.long)
    keys, values = k_cache, v_cache
    visible = torch.arange(Lmax, device=q.device)[None, :] < lens[:, None]
    if prefix is not None:
        kp, vp, plen = prefix
        keys = torch.cat([kp[None, :plen].expand(B, -1, -1, -1), k_cache], dim=1)
        values = torch.cat([vp[None, :plen].expand(B, -1, -1, -1), v_cache], dim=1)
        visible = torch.cat([visible.new_ones(B, plen), visible], dim=1)
    out, lse = bidirectional_attention(
        q[:, None], keys, values, key_padding_mask=visible, scale=scale, return_lse=True
    )
    out, lse = out[:, 0], lse[:, :, 0]
    return (out, lse) if return_lse else out
