"""Static KV cache of the executor and the two :class:`~hybridkernels.models.KVCacheHook` s that
fill and read it (prefill, one-token decode).

Layout: one buffer per K and V, ``[num_layers, B, Lmax, Hkv, D]``; ``cache.k[i]`` is layer
``i``'s ``[B, Lmax, Hkv, D]`` cache, the layout of :func:`hybridkernels.ops.kv_append` and
:func:`hybridkernels.ops.decode_attention`. Row ``b`` holds its valid tokens in slots
``0 .. len_b - 1`` (no padding inside the cache: the executor packs left-padded prompts before
prefill), so a row's cache length is all ``decode_attention`` needs to mask it.
"""

from __future__ import annotations

import torch

from .. import _cuda, ops
from ..ops import _attention as ops_attention
from ..ops import _decode as ops_decode
from ..ops import _kv_append as ops_kv_append
from ..validation import renamed


class StaticKVCache:
    """Preallocated keys and values ``[num_layers, batch, max_len, num_kv_heads, head_dim]``."""

    def __init__(self, num_layers, batch, max_len, num_kv_heads, head_dim, *, dtype, device):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        # Zeros, not empty: slots past a row's length are never attended, but an op that masks
        # them after the fact (0 * NaN) must not meet NaN bit patterns of fresh memory there.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, *, dtype, device) -> StaticKVCache:
        """A cache shaped for a :class:`~hybridkernels.models.TransformerConfig`."""
        return cls(
            config.num_layers,
            batch,
            max_len,
            config.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefillHook:
    """Causal attention over the call's own tokens (rows packed: valid tokens first, padding at
    the end, so no mask is needed for the valid queries), writing each layer's keys and values to
    slots ``0 .. T-1`` of every cache row. With ``repeats = n`` the call's row ``b`` fills cache
    rows ``b * n .. b * n + n - 1`` (one prefill serves ``n`` samples). ``attention_backend``
    goes to the causal attention op, ``decode_backend`` to ``kv_append`` (``cache_backend`` is
    its deprecated name)."""

    def __init__(
        self,
        cache: StaticKVCache,
        *,
        repeats: int = 1,
        attention_backend: str | None = None,
        decode_backend: str | None = None,
        cache_backend: str | None = None,
    ):
        self.cache, self.repeats = cache, repeats
        self.attention_backend = attention_backend
        self.decode_backend = renamed(
            "PrefillHook", "decode_backend", decode_backend, "cache_backend", cache_backend
        )
        self.positions = torch.zeros(cache.batch, dtype=torch.int32, device=cache.k.device)
        # The packed causal prefill needs no mask: on the CPU (automatic backend) torch's SDPA.
        device = cache.k.device
        self._sdpa = ops_attention.sdpa_instead_of_reference(device, attention_backend)
        # The writes go straight to _C on the CPU when kv_append would run it anyway (as the
        # decode steps do): slots 0 .. T-1 of every row, in bounds by construction.
        self._direct_append = (
            device.type == "cpu"
            and _cuda.available()
            and ops_kv_append.DISPATCH.choose(self.decode_backend, device) == "cuda"
            and ops_kv_append.IMPLEMENTATIONS.get("cuda") is _cuda.kv_append
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_rows, v_rows = k, v
        if self.repeats > 1:
            k_rows, v_rows = k.repeat_interleave(self.repeats, 0), v.repeat_interleave(self.repeats, 0)
        if self._direct_append and not torch.compiler.is_compiling():
            _cuda.kv_append_direct(self.cache.k[layer], self.cache.v[layer], k_rows, v_rows, self.positions)
        else:
            ops.kv_append(
                self.cache.k[layer],
                self.cache.v[layer],
                k_rows,
                v_rows,
                self.positions,
                backend=self.decode_backend,
            )
        if self._sdpa:
            return ops.sdpa_attention(q, k, v, causal=True)
        return ops.attention(q, k, v, causal=True, backend=self.attention_backend)


class DecodeHook:
    """One new token per row: ``kv_append`` at slot ``append_at[b]``, then ``decode_attention``
    over the row's first ``cache_lens[b]`` slots (``append_at + 1``, set by the caller before the
    forward), after a shared ``prefix`` cache of ``prefix_len`` tokens when given (cascade: one
    copy of the prompt serves every row). ``append_at`` / ``cache_lens`` are int32 ``[B]`` device
    buffers the caller updates in place, so the same hook serves every step of a CUDA graph.
    ``decode_backend`` (formerly ``backend``) goes to both ops.

    :meth:`prepare` (once per generate call) picks the path of the coming steps: on the CPU, when
    both ops resolve to the ``_C`` extension, the step calls it directly through
    :class:`hybridkernels._cuda.StaticDecodeKernels` (no per-call dispatch, checks or
    allocation: the buffers are fixed and valid by construction); otherwise, on CUDA (graphs, the
    custom ops) and under ``torch.compile``, through the ops."""

    def __init__(
        self,
        cache: StaticKVCache,
        append_at: torch.Tensor,
        cache_lens: torch.Tensor,
        *,
        prefix: StaticKVCache | None = None,
        prefix_len: int = 0,
        decode_backend: str | None = None,
        backend: str | None = None,
        num_heads: int | None = None,
    ):
        self.cache, self.append_at, self.cache_lens = cache, append_at, cache_lens
        self.prefix, self.prefix_len = prefix, prefix_len
        self.decode_backend = renamed("DecodeHook", "decode_backend", decode_backend, "backend", backend)
        self.num_heads = num_heads
        self._kernels: _cuda.StaticDecodeKernels | None = None
        self._direct: _cuda.StaticDecodeKernels | None = None

    def prepare(self) -> bool:
        """Choose the path of the coming steps (the backends resolved once, not per call);
        returns whether they call ``_C`` directly. Needs ``num_heads`` for the direct path."""
        self._direct = None
        k = self.cache.k
        if k.device.type != "cpu" or self.num_heads is None or not _cuda.available():
            return False
        tensors = [k[0], k[0], self.cache.v[0]]
        if self.prefix is not None and self.prefix_len:
            tensors += [self.prefix.k[0, 0], self.prefix.v[0, 0]]
        names = (
            ops_decode.DISPATCH.choose(
                self.decode_backend, k.device, {"cuda": ops_decode.compiled_reason(k.shape[-1], tensors)}
            ),
            ops_kv_append.DISPATCH.choose(self.decode_backend, k.device),
        )
        stock = (
            ops_decode.IMPLEMENTATIONS.get("cuda") is _cuda.decode_attention
            and ops_kv_append.IMPLEMENTATIONS.get("cuda") is _cuda.kv_append
        )
        if names != ("cuda", "cuda") or not stock:  # another backend, or a swapped implementation
            return False
        if self._kernels is None:
            prefix = None
            if self.prefix is not None and self.prefix_len:
                prefix = (self.prefix.k, self.prefix.v, self.prefix_len)
            self._kernels = _cuda.StaticDecodeKernels(
                self.cache.k, self.cache.v, self.append_at, self.cache_lens,
                num_heads=self.num_heads, prefix=prefix,
            )  # fmt: skip
        self._direct = self._kernels
        return True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        direct = self._direct
        if (
            direct is not None
            and q.stride(-1) == 1
            and k.stride(-1) == 1
            and v.stride(-1) == 1
            and not torch.compiler.is_compiling()
        ):
            return direct(layer, q, k, v)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        ops.kv_append(k_cache, v_cache, k, v, self.append_at, backend=self.decode_backend)
        prefix = None
        if self.prefix is not None:
            prefix = (self.prefix.k[layer, 0], self.prefix.v[layer, 0], self.prefix_len)
        out = ops.decode_attention(
            q[:, 0], k_cache, v_cache, self.cache_lens, prefix=prefix, backend=self.decode_backend
        )
        return out[:, None]
