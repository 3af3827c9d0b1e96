"""Training forwards of the toy's transformers through ``torch.nn.functional.scaled_dot_product_attention``.

:class:`SDPAHook` is a :class:`~hybridkernels.models.transformer.KVCacheHook` that stores nothing:
it attends this call's queries to this call's keys with SDPA (key padding mask, optional causal
mask), so gradients flow through PyTorch's fused attention on any device. :func:`train_forward`
runs a :class:`~hybridkernels.models.Transformer` with it and returns the final hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.transformer import Transformer, default_position_ids


class SDPAHook:
    """Attention of ``q [B, T, Hq, D]`` over ``k``/``v [B, T, Hkv, D]`` (GQA: kv heads repeated)
    with SDPA. ``key_padding_mask``: bool ``[B, T]``, True = attend, or None; ``causal``: lower
    triangular mask (combined with the padding mask when both are given)."""

    def __init__(self, key_padding_mask: torch.Tensor | None, causal: bool):
        self.key_padding_mask = key_padding_mask
        self.causal = causal

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, Hq, D = q.shape
        group = Hq // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = None
        if self.key_padding_mask is not None:
            mask = self.key_padding_mask[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return out.transpose(1, 2)


def train_forward(
    model: Transformer, ids: torch.Tensor, valid: torch.Tensor | None = None, *, causal: bool
) -> torch.Tensor:
    """Final hidden states ``[B, L, d]`` of ``model`` on int64 ``ids [B, L]`` through SDPA.

    ``valid``: bool ``[B, L]`` key padding mask (True = token), also used for the positions
    (``cumsum - 1``, as the model's own forward counts them); None = all tokens, positions
    ``0 .. L-1``."""
    B, L = ids.shape
    positions = default_position_ids(valid, B, L, ids.device)
    hook = SDPAHook(valid, causal)
    return model(ids, position_ids=positions, kv_cache=hook, compute_logits=False).hidden
