"""Loads the compiled ``hybridkernels._C`` module and exposes its functions as torch custom ops.

``_C`` is plain pybind11 (built without torch): it takes pointers, sizes, strides, dtype codes
and the CUDA stream as integers. This module converts tensors to those arguments and
registers each function with ``torch.library.custom_op`` plus a fake implementation, so the
ops trace under ``torch.compile`` and record into CUDA graphs. Input validation happens in
``hybridkernels.ops``; ``_C`` checks again what it is given and never crashes the process.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

# Must match csrc/common.h (hk::DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
}


def available() -> bool:
    """True when ``_C`` imported (it always has the CPU implementation)."""
    return _C is not None


def build_info() -> dict:
    """``{"cuda": bool, "cuda_archs": "80;90", "cuda_runtime_version": int | None, "cxx": str}``."""
    if _C is None:
        return {"cuda": False, "cuda_archs": "", "cuda_runtime_version": None, "cxx": None}
    return dict(_C.build_info())


def has_cuda() -> bool:
    """True when ``_C`` was compiled with its CUDA kernels."""
    return build_info()["cuda"]


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``_C`` cannot run on ``device``, or None when it can."""
    if _C is None:
        return f"hybridkernels._C failed to import ({IMPORT_ERROR})"
    if device.type == "cuda" and not has_cuda():
        return "hybridkernels._C was built without CUDA (nvcc not found at install time)"
    if device.type not in ("cpu", "cuda"):
        return f"hybridkernels._C runs on cpu and cuda tensors, not {device.type}"
    return None


def _device_and_stream(t: torch.Tensor) -> tuple[int, int]:
    if t.device.type == "cuda":
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return -1, 0


def _strides(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else list(t.stride())


@torch.library.custom_op("hybridkernels::kv_append", mutates_args=("k_cache", "v_cache"))
def _kv_append_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    rope_positions: torch.Tensor | None = None,
) -> None:
    device, stream = _device_and_stream(k_cache)
    rope = rope_cos is not None
    positions = positions.contiguous()  # _C reads positions[b] at b (no stride)
    _C.kv_append(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_new.data_ptr(),
        v_new.data_ptr(),
        positions.data_ptr(),
        list(k_cache.shape),
        k_new.shape[1],
        list(k_cache.stride()),
        list(v_cache.stride()),
        list(k_new.stride()),
        list(v_new.stride()),
        DTYPE_CODES[k_cache.dtype],
        DTYPE_CODES[positions.dtype],
        device,
        stream,
        rope_cos=rope_cos.data_ptr() if rope else 0,
        rope_sin=rope_sin.data_ptr() if rope else 0,
        rope_dtype=DTYPE_CODES[rope_cos.dtype] if rope else 0,
        rope_shape=list(rope_cos.shape) if rope else [],
        rope_cos_strides=_strides(rope_cos),
        rope_sin_strides=_strides(rope_sin),
        rope_positions=rope_positions.data_ptr() if rope and rope_positions is not None else 0,
        rope_positions_dtype=DTYPE_CODES[rope_positions.dtype] if rope_positions is not None else 4,
        rope_positions_shape=list(rope_positions.shape) if rope_positions is not None else [],
        rope_positions_strides=_strides(rope_positions),
    )


@_kv_append_op.register_fake
def _(k_cache, v_cache, k_new, v_new, positions, rope_cos=None, rope_sin=None, rope_positions=None):
    return None


def kv_append_direct(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """``_C.kv_append`` without the custom op's dispatch (no RoPE): for CPU eager callers whose
    inputs are valid by construction (the executor's prefill). ``_C`` still checks sizes and
    positions against the cache."""
    device, stream = _device_and_stream(k_cache)
    positions = positions.contiguous()
    _C.kv_append(
        k_cache.data_ptr(), v_cache.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), positions.data_ptr(),
        list(k_cache.shape), k_new.shape[1], list(k_cache.stride()), list(v_cache.stride()),
        list(k_new.stride()), list(v_new.stride()), DTYPE_CODES[k_cache.dtype], DTYPE_CODES[positions.dtype],
        device, stream,
    )  # fmt: skip


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
    """``_C.kv_append`` on torch tensors (validated by ``hybridkernels.ops.kv_append``)."""
    cos, sin = rope if rope is not None else (None, None)
    _kv_append_op(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions)


def _decode_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
    prefix_len: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_splits: int,
) -> None:
    device, stream = _device_and_stream(q)
    dtype = DTYPE_CODES[q.dtype]
    cache_lens = cache_lens.contiguous()  # _C reads cache_lens[b] at b (no stride)
    splits, ws_floats = _C.decode_plan(
        list(q.shape), list(k_cache.shape), prefix_len, dtype, num_splits, device
    )
    # The split kernel's partial results; from torch's allocator, so CUDA graphs can capture it.
    ws = torch.empty(ws_floats, dtype=torch.float32, device=q.device) if ws_floats else None
    has_prefix = prefix_len > 0
    _C.decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        cache_lens.data_ptr(),
        k_prefix.data_ptr() if has_prefix else 0,
        v_prefix.data_ptr() if has_prefix else 0,
        out.data_ptr(),
        lse.data_ptr(),
        ws.data_ptr() if ws is not None else 0,
        ws_floats,
        list(q.shape),
        list(k_cache.shape),
        list(k_prefix.shape) if has_prefix else [],
        prefix_len,
        list(q.stride()),
        list(k_cache.stride()),
        list(v_cache.stride()),
        _strides(k_prefix) if has_prefix else [],
        _strides(v_prefix) if has_prefix else [],
        list(out.stride()),
        list(lse.stride()),
        scale,
        dtype,
        DTYPE_CODES[cache_lens.dtype],
        splits,
        device,
        stream,
    )


@torch.library.custom_op("hybridkernels::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
    prefix_len: int,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    _decode_launch(
        q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, out, lse, scale, num_splits
    )
    return out, lse


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, scale, num_splits):
    B, Hq, D = q.shape
    return q.new_empty(B, Hq, D), q.new_empty(B, Hq, dtype=torch.float32)


@torch.library.custom_op("hybridkernels::decode_attention_out", mutates_args=("out", "lse"))
def _decode_attention_out_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
    prefix_len: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_splits: int,
) -> None:
    _decode_launch(
        q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, out, lse, scale, num_splits
    )


@_decode_attention_out_op.register_fake
def _(q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, out, lse, scale, num_splits):
    return None


def _decode_inputs(q, prefix, scale):
    k_prefix, v_prefix, prefix_len = prefix if prefix is not None else (None, None, 0)
    if prefix_len == 0:
        k_prefix = v_prefix = None
    return k_prefix, v_prefix, int(prefix_len), float(q.shape[-1] ** -0.5 if scale is None else scale)


def _check_out_buffers(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """_C writes ``out`` as q's dtype and shape and ``lse`` as float32 [B, Hq]: anything else
    would be written out of bounds."""
    B, Hq, _ = q.shape
    for name, t, shape, dtype in (
        ("out", out, tuple(q.shape), q.dtype),
        ("lse", lse, (B, Hq), torch.float32),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"decode_attention_out: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"decode_attention_out: {name} must have dtype {dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"decode_attention_out: {name} is on {t.device}, expected {q.device} (q's device)"
            )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
):
    """``_C.decode_attention`` on torch tensors (validated by ``hybridkernels.ops.decode_attention``).

    ``num_splits``: 0 picks the split count from the sizes and the GPU (one pass on the CPU); a
    positive count forces that many splits (tests use it to exercise the merge on either device).
    """
    k_prefix, v_prefix, prefix_len, scale = _decode_inputs(q, prefix, scale)
    out, lse = _decode_attention_op(
        q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, scale, num_splits
    )
    return (out, lse) if return_lse else out


def decode_attention_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    num_splits: int = 0,
) -> None:
    """Like :func:`decode_attention` but writes into ``out [B, Hq, D]`` (q's dtype, head dim
    contiguous) and ``lse [B, Hq]`` float32: static buffers for CUDA graphs."""
    _check_out_buffers(q, out, lse)
    k_prefix, v_prefix, prefix_len, scale = _decode_inputs(q, prefix, scale)
    _decode_attention_out_op(
        q, k_cache, v_cache, cache_lens, k_prefix, v_prefix, prefix_len, out, lse, scale, num_splits
    )


class StaticDecodeKernels:
    """``kv_append`` + ``decode_attention`` of one fixed decode configuration, calling ``_C``
    straight from Python: the CPU eager path of the executor's decode step.

    The custom ops above cost tens of microseconds a call in dispatch (``torch.library``,
    argument conversion, a fresh output and workspace); a decode step of a small model calls them
    twice per layer. Here everything that does not change between steps is converted once: the
    caches' per-layer pointers, shapes and strides, the int32 ``append_at`` / ``cache_lens``
    pointers, the prefix, the split count, and one preallocated ``out [B, Hq, D]`` per layer.
    Inputs are not validated (:func:`hybridkernels.ops.decode_attention` has checked nothing:
    the caller guarantees, by construction, what it would check); ``_C`` still checks sizes and
    lengths and raises instead of reading out of bounds.

    Args:
        k_cache, v_cache: contiguous ``[num_layers, B, Lmax, Hkv, D]`` (``D`` in {64, 128}).
        append_at, cache_lens: contiguous int32 ``[B]``, updated in place by the caller.
        num_heads: ``Hq`` (a multiple of ``Hkv``).
        prefix: optional ``(k, v, prefix_len)`` with contiguous ``[num_layers, 1, Lp, Hkv, D]``
            tensors (every row attends the first ``prefix_len`` of them first).
        scale: softmax scale, default ``1 / sqrt(D)``.
    """

    def __init__(self, k_cache, v_cache, append_at, cache_lens, *, num_heads, prefix=None, scale=None):
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("append_at", append_at),
                        ("cache_lens", cache_lens)):  # fmt: skip
            if not t.is_contiguous():
                raise ValueError(f"StaticDecodeKernels: {name} must be contiguous")
        if append_at.dtype != torch.int32 or cache_lens.dtype != torch.int32:
            raise TypeError("StaticDecodeKernels: append_at and cache_lens must be int32")
        layers, B, Lmax, Hkv, D = k_cache.shape
        self._keep = (k_cache, v_cache, append_at, cache_lens, prefix)  # the pointers' owners
        self.device, self.stream = _device_and_stream(k_cache)
        self.dtype = DTYPE_CODES[k_cache.dtype]
        self.cache_shape = [B, Lmax, Hkv, D]
        self.cache_strides = list(k_cache.stride()[1:])
        layer_bytes = k_cache.stride(0) * k_cache.element_size()
        self.k_ptrs = [k_cache.data_ptr() + i * layer_bytes for i in range(layers)]
        self.v_ptrs = [v_cache.data_ptr() + i * layer_bytes for i in range(layers)]
        self.append_at, self.cache_lens = append_at.data_ptr(), cache_lens.data_ptr()
        self.q_shape = [B, num_heads, D]
        self.scale = float(D**-0.5 if scale is None else scale)
        self.prefix_len, self.prefix_shape, self.prefix_strides = 0, [], []
        self.kp_ptrs = self.vp_ptrs = [0] * layers
        if prefix is not None and prefix[2] > 0:
            kp, vp, self.prefix_len = prefix[0], prefix[1], int(prefix[2])
            if not (kp.is_contiguous() and vp.is_contiguous()):
                raise ValueError("StaticDecodeKernels: the prefix caches must be contiguous")
            self.prefix_shape = list(kp.shape[2:])
            self.prefix_strides = list(kp.stride()[2:])
            p_bytes = kp.stride(0) * kp.element_size()
            self.kp_ptrs = [kp.data_ptr() + i * p_bytes for i in range(layers)]
            self.vp_ptrs = [vp.data_ptr() + i * p_bytes for i in range(layers)]
        self.splits, ws_floats = _C.decode_plan(
            self.q_shape, self.cache_shape, self.prefix_len, self.dtype, 0, self.device
        )
        self.workspace = torch.empty(max(ws_floats, 1), dtype=torch.float32, device=k_cache.device)
        self.ws_floats = ws_floats
        self.out = torch.empty(layers, B, num_heads, D, dtype=k_cache.dtype, device=k_cache.device)
        self.lse = torch.empty(B, num_heads, dtype=torch.float32, device=k_cache.device)
        self.out_strides = list(self.out.stride()[1:])
        self.out_ptrs = [self.out[i].data_ptr() for i in range(layers)]
        self.outputs = [self.out[i][:, None] for i in range(layers)]  # [B, 1, Hq, D] views
        self.lse_strides = list(self.lse.stride())
        self.lse_ptr, self.ws_ptr = self.lse.data_ptr(), self.workspace.data_ptr()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append ``k``/``v [B, 1, Hkv, D]`` at ``append_at`` of layer ``layer``'s cache, attend
        ``q [B, 1, Hq, D]`` (head dim contiguous) over each row's first ``cache_lens`` slots;
        returns layer ``layer``'s static output, ``[B, 1, Hq, D]`` (valid until the next step)."""
        kc, vc = self.k_ptrs[layer], self.v_ptrs[layer]
        strides = self.cache_strides
        _C.kv_append(kc, vc, k.data_ptr(), v.data_ptr(), self.append_at, self.cache_shape, 1,
                     strides, strides, list(k.stride()), list(v.stride()), self.dtype, 3, self.device,
                     self.stream)  # fmt: skip
        qs = q.stride()
        _C.decode_attention(
            q.data_ptr(), kc, vc, self.cache_lens, self.kp_ptrs[layer], self.vp_ptrs[layer],
            self.out_ptrs[layer], self.lse_ptr, self.ws_ptr, self.ws_floats,
            self.q_shape, self.cache_shape, self.prefix_shape, self.prefix_len, [qs[0], qs[2], qs[3]],
            strides, strides, self.prefix_strides, self.prefix_strides, self.out_strides,
            self.lse_strides, self.scale, self.dtype, 3, self.splits, self.device, self.stream,
        )  # fmt: skip
        return self.outputs[layer]


def unmask_scores(
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    banned_token_ids=(),
    packed: torch.Tensor | None = None,
    k_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_C.unmask_scores``: per row of ``logits = hidden @ lm_head.T`` without the logits.

    ``hidden [R, d]`` and ``lm_head [V, d]``: CPU tensors of one float dtype (fp16 / bf16 are
    converted to float32 a tile at a time); ``banned_token_ids``: ids in ``[0, V)`` whose logit
    is ``-inf``. Returns ``(argmax int64 [R], max float32 [R], second float32 [R], sum_exp
    float64 [R])``: the first index of the maximum (of the first NaN: ``torch.argmax``'s rule),
    the maximum, the largest logit at any other index (NaN for a NaN row), and ``sum_v
    exp(logit_v - max)`` (NaN when the maximum is NaN or infinite). The products are float32
    FMAs in another order than torch's matmul: each logit within ``d * 2^-24 * ||h|| ||w_v||``
    of the exact value. One pass over ``lm_head``, on the calling thread (the GIL is released).

    ``packed``: optionally ``lm_head`` as a contiguous float32 ``[ceil(V / P), d, P]`` tensor,
    ``P = _C.unmask_panel`` (``packed[p, k, c] = lm_head[p * P + c, k]``, zero past ``V``; see
    ``ops._unmask_cpu.packed_lm_head``; ``P`` is 0 on CPUs without AVX2, which take none), read
    instead of ``lm_head``; each logit then sums its products in chunks of ``k_chunk``
    consecutive ``k`` (FMAs from 0), the chunk sums in ``k`` order: within ``(k_chunk + ceil(d /
    k_chunk) - 1) * 2^-24 * sum_k |h_k w_vk|``.
    """
    for name, t in (("hidden", hidden), ("lm_head", lm_head)):
        if t.device.type != "cpu":
            raise ValueError(f"unmask_scores: {name} must be a CPU tensor, got {t.device}")
        if t.dim() != 2:
            raise ValueError(f"unmask_scores: {name} must be 2-d, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"unmask_scores: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if hidden.dtype != lm_head.dtype:
        raise TypeError(f"unmask_scores: hidden is {hidden.dtype} but lm_head is {lm_head.dtype}")
    packed_args = ()
    if packed is not None:
        panel = _C.unmask_panel
        if not panel:
            raise ValueError("unmask_scores: this CPU has no packed path (_C.unmask_panel is 0)")
        V, d = lm_head.shape
        want = (-(-V // panel), d, panel)
        if packed.device.type != "cpu" or packed.dtype != torch.float32 or not packed.is_contiguous():
            raise TypeError(
                f"unmask_scores: packed must be a contiguous float32 CPU tensor, got {packed.dtype}"
            )
        if tuple(packed.shape) != want:
            raise ValueError(f"unmask_scores: packed must have shape {want}, got {tuple(packed.shape)}")
        if not isinstance(k_chunk, int) or k_chunk < 1:
            raise ValueError(f"unmask_scores: k_chunk must be an int >= 1 with packed, got {k_chunk!r}")
        packed_args = (-1, packed.data_ptr(), want[0], k_chunk)
    R = hidden.shape[0]
    argmax = torch.empty(R, dtype=torch.int64)
    top, second = torch.empty(R), torch.empty(R)
    sum_exp = torch.empty(R, dtype=torch.float64)
    _C.unmask_scores(
        hidden.data_ptr(), lm_head.data_ptr(), list(hidden.shape), list(lm_head.shape),
        list(hidden.stride()), list(lm_head.stride()), DTYPE_CODES[hidden.dtype],
        [int(t) for t in banned_token_ids], argmax.data_ptr(), top.data_ptr(), second.data_ptr(),
        sum_exp.data_ptr(), *packed_args,
    )  # fmt: skip
    return argmax, top, second, sum_exp


# ---------------------------------------------------------------- decoder-layer elementwise ops
def _rows_of(name: str, t: torch.Tensor, cols: int | None = None) -> tuple[int, int, int]:
    """(rows, cols, row stride) of a float32 CPU tensor whose last dim is contiguous."""
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if t.dim() != 2 or t.stride(1) != 1 or (cols is not None and t.shape[1] != cols):
        want = f"[rows, {cols}]" if cols is not None else "[rows, cols]"
        raise ValueError(f"{name} must be {want} with contiguous rows, got {tuple(t.shape)} {t.stride()}")
    return t.shape[0], t.shape[1], t.stride(0)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``_C.rms_norm`` on float32 CPU ``x [R, d]``: with ``residual [R, d]``, ``x += residual`` in
    place first (the residual stream); returns ``weight * x / sqrt(mean(x^2) + eps)`` (in ``out``
    when given, which may be ``x``). Sums of squares in 16 partial sums: a few ulp from torch."""
    rows, dim, xs = _rows_of("rms_norm: x", x)
    _rows_of("rms_norm: weight", weight[None], dim)
    out = torch.empty_like(x) if out is None else out
    if _rows_of("rms_norm: out", out, dim)[0] != rows:
        raise ValueError(f"rms_norm: out has {out.shape[0]} rows, x {rows}")
    rp, rs = 0, 0
    if residual is not None:
        if _rows_of("rms_norm: residual", residual, dim)[0] != rows:
            raise ValueError(f"rms_norm: residual has {residual.shape[0]} rows, x {rows}")
        rp, rs = residual.data_ptr(), residual.stride(0)
    _C.rms_norm(x.data_ptr(), xs, rp, rs, weight.data_ptr(), out.data_ptr(), out.stride(0), rows, dim, eps)
    return out


def rotary_(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """``_C.rotary``, in place on float32 CPU ``x [R, H, D]`` (each head contiguous): rotate-half
    RoPE with rows ``positions [R]`` (int64) of the ``[P, D]`` tables ``cos`` (``cat(c, c)``) and
    ``sin_signed`` (``cat(-s, s)``); bitwise ``x * cos + x.roll(D // 2, -1) * sin_signed``."""
    if x.dim() != 3 or x.stride(2) != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(
            "rotary_: x must be a float32 CPU [R, H, D] tensor with contiguous heads, "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    R, H, D = x.shape
    P = _rows_of("rotary_: cos", cos, D)[0]
    if _rows_of("rotary_: sin_signed", sin_signed, D)[0] != P or cos.stride(0) != sin_signed.stride(0):
        raise ValueError("rotary_: cos and sin_signed must have one shape and stride")
    if positions.dtype != torch.int64 or positions.shape != (R,) or not positions.is_contiguous():
        raise ValueError(
            f"rotary_: positions must be contiguous int64 [{R}], "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    _C.rotary(x.data_ptr(), R, H, D, x.stride(0), x.stride(1), positions.data_ptr(), cos.data_ptr(),
              sin_signed.data_ptr(), P, cos.stride(0))  # fmt: skip
    return x


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``_C.silu_mul``: ``silu(gate) * up`` for float32 CPU ``[R, n]`` rows sharing a row stride
    (e.g. the two halves of a fused gate/up product), into ``out`` (default: a new tensor)."""
    rows, n, gs = _rows_of("silu_mul: gate", gate)
    if _rows_of("silu_mul: up", up, n)[:1] != (rows,) or up.stride(0) != gs:
        raise ValueError("silu_mul: gate and up must have one shape and row stride")
    out = torch.empty(rows, n) if out is None else out
    if _rows_of("silu_mul: out", out, n)[0] != rows:
        raise ValueError(f"silu_mul: out has {out.shape[0]} rows, gate {rows}")
    _C.silu_mul(gate.data_ptr(), up.data_ptr(), gs, out.data_ptr(), out.stride(0), rows, n)
    return out
