"""``DiffusionKVCache``: the planner's prefix / dual cache, one K/V buffer per layer over the whole
sequence.

Non-causal attention does not care about the order of its keys (RoPE is applied before they are
stored), so the cache never concatenates: a call writes its tokens' keys and values into their
slots of the buffer (``index_copy_`` with a device tensor of slots, so one CUDA graph serves every
block) and attends over the first ``key_length`` slots of the buffer, in which those slots were
just overwritten.

* Refresh (a full forward): slots = every position, ``key_length = L``; fills the whole buffer.
* Dual cache step: slots = the current window, ``key_length = L`` (the prompt, finished blocks and
  the masked suffix are read from the last refresh).
* Prefix cache step: slots = the current window, ``key_length`` = the window's end (nothing after
  the current block is attended).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import _attention as ops_attention
from ..validation import renamed


class DiffusionKVCache:
    """Per-layer ``k``/``v`` buffers ``[B, L, Hkv, D]`` (post-RoPE) and the hook
    ``attend(layer, q, k, v)`` of :class:`~hybridkernels.models.Transformer`.

    ``key_padding_mask``: bool ``[B, L]`` (True = attend) or None. Set the tokens of the next
    forward with :meth:`set_queries` before calling the model with ``kv_cache=self``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        key_padding_mask: torch.Tensor | None = None,
        attention_backend: str | None = None,
        backend: str | None = None,
    ):
        shape = (batch, length, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, length):
            raise ValueError(
                f"DiffusionKVCache: key_padding_mask must be [B, L] = [{batch}, {length}], "
                f"got {tuple(key_padding_mask.shape)}"
            )
        self.key_padding_mask = key_padding_mask
        self.attention_backend = renamed(
            "DiffusionKVCache", "attention_backend", attention_backend, "backend", backend
        )
        self.length = length
        # On the CPU (automatic backend) the cached steps run torch's SDPA, as PrefillHook does.
        self._sdpa = ops_attention.sdpa_instead_of_reference(device, self.attention_backend)
        self.slots: torch.Tensor | None = None
        self.key_length = length

    def set_queries(self, slots: torch.Tensor, key_length: int) -> None:
        """The next forward's tokens sit at ``slots`` (int64 ``[T]``, on the buffers' device) and
        attend to the buffer's first ``key_length`` positions."""
        if not 0 < key_length <= self.length:
            raise ValueError(f"DiffusionKVCache: key_length must be in [1, {self.length}], got {key_length}")
        self.slots, self.key_length = slots, key_length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        given = 0 if self.slots is None else self.slots.numel()
        if given != q.shape[1]:
            raise ValueError(
                f"DiffusionKVCache: set_queries() was given {given} slots, "
                f"the forward has {q.shape[1]} tokens"
            )
        kb, vb = self.k[layer], self.v[layer]
        kb.index_copy_(1, self.slots, k)
        vb.index_copy_(1, self.slots, v)
        n = self.key_length
        mask = None if self.key_padding_mask is None else self.key_padding_mask[:, :n]
        if n < self.length:
            kb, vb = kb[:, :n], vb[:, :n]
        if self._sdpa and not torch.is_grad_enabled():
            return ops.sdpa_attention(q, kb, vb, key_padding_mask=mask)
        return ops.attention(q, kb, vb, key_padding_mask=mask, backend=self.attention_backend)
