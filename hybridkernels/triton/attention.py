"""Flash-attention forward (Triton) behind :func:`hybridkernels.ops.attention`.

Layout follows flash-attn: q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]``, GQA without repeated
K/V, optional bool key padding mask ``[B, Lk]``, ``causal=True`` aligned to the end of the keys.
One kernel, :func:`_attn_fwd_kernel`, serves both regimes of the planner (long queries; a short
block over a long cache, keys split across programs and merged by :func:`_merge_splits_kernel`).
fp16/bf16 dots with fp32 accumulation, fp32 inputs on 3xTF32. Autotuned once per shape class
(:func:`attention_configs`), one fixed configuration under the CPU interpreter. The entry point
is :func:`flash_attention`; the design notes sit next to the code they explain.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from ..common import triton_interpreting
from .registry import CompileCase, compile_cases


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_base,
    stride_kl,
    stride_vl,
    stride_ml,
    row_lim,
    offs_d,
    d_ok,
    lo,
    hi,
    Lk,
    qk_scale,
    HAS_MASK: tl.constexpr,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [lo, hi). ``EDGE``: the tiles may
    cross the end of the keys or a row's causal limit ``row_lim`` (keys ``j < row_lim[r]`` are
    visible to row ``r``), so they are masked per element."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if EDGE:
            n_ok = offs_n < Lk
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :]
        if EDGE or not EVEN_D:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale

        # Scores in the log2 domain; -inf marks keys a row cannot see.
        if HAS_MASK or EDGE:
            if EDGE:
                visible = n_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] < row_lim[:, None])
            else:
                visible = tl.full([1, BLOCK_N], 1, tl.int1)
            if HAS_MASK:
                if EDGE:
                    key_ok = tl.load(mask_base + offs_n * stride_ml, mask=n_ok, other=0)
                else:
                    key_ok = tl.load(mask_base + offs_n * stride_ml)
                visible = visible & (key_ok != 0)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible so far keeps m = -inf: subtract 0 instead (exp2 -> 0).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
        if EDGE or not EVEN_D:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if HAS_MASK:
            # Padded slots may hold anything (an uninitialised cache: NaN, inf) and p = 0 there,
            # but 0 * NaN = NaN would reach the whole row through the dot: zero them.
            v = tl.where((key_ok != 0)[:, None], v, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Regimes. Long queries (whole-sequence forward, causal prefill): grid ``(row blocks, B * Hkv)``,
# each program streams all the keys of its rows with an online softmax (fp32 accumulation).
# Short queries over a long cache (a 16-64 token block over thousands of cached keys): the same
# grid gets a third axis that splits the keys, so a batch-1 call still fills the GPU; each split
# writes a normalised partial output and its log-sum-exp, merged by _merge_splits_kernel.
#
# GQA: the G = Hq // Hkv query heads that share a kv head are packed into the rows of one program
# (row r = query r // G of head hkv * G + r % G), so each K/V tile is loaded once per group. The
# key padding mask is read per key tile. Causal masks, CAUSAL=True with a runtime block size cb:
# query i, at key position p = i + Lk - Lq, sees keys j < (p // cb + 1) * cb, i.e. j <= p for
# cb = 1 (causal=True) and the keys of its own block and the blocks before it for cb = b
# (block_causal=b: block diffusion). One row limit per row, computed once per program; tiles that
# no row of a program can see are never visited, and only the tiles that cross a row's limit or
# the end of the keys pay for masking. A row that sees no key gets output 0 and lse -inf.
#
# Hopper: on sm_90 the 16-bit tl.dot s (BLOCK_M >= 64) lower to wgmma and the K/V loads are
# software-pipelined with cp.async. No TMA descriptors or warp specialisation: the packed GQA rows
# are a gather over [B, L, H, D] strides (not one rectangular box when G does not divide
# BLOCK_M), and those APIs changed between the Triton versions supported (3.6 and 3.8), so a TMA
# path would need its own tests on a GPU.
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    KeyMask,
    Out,
    Lse,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_mb,
    stride_ml,
    stride_os,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ll,
    Lq,
    Lk,
    Hkv,
    GROUP,
    causal_block,
    split_size,
    sm_scale,
    ROWS_CLASS,
    KEYS_CLASS,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M packed (query, head-of-group) rows of one (batch, kv head), keys
    ``[split * split_size, (split + 1) * split_size)``. Writes the normalised output and the
    natural-log log-sum-exp of its rows (partials when the keys are split: axis 2 of the grid).
    ``ROWS_CLASS``/``KEYS_CLASS`` are autotuning keys only."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last row blocks see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < Lq * GROUP
    qi = offs_r // GROUP
    hq = hkv * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    q_ptrs = Q + b * stride_qb + qi[:, None] * stride_ql + hq[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hkv.to(tl.int64) * stride_vh
    mask_base = KeyMask + b * stride_mb

    # Key range of this program; [lo, mid) needs no per-element masking, [mid, hi) does.
    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, Lk)
    full = hi
    causal_shift = Lk - Lq
    # Exclusive key limit of each row (rows past Lq clamp to the last query: they store nothing).
    row_lim = ((tl.minimum(qi, Lq - 1) + causal_shift) // causal_block + 1) * causal_block
    if CAUSAL:
        q_first = (pid_m * BLOCK_M) // GROUP
        q_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, Lq - 1)
        hi = tl.minimum(hi, ((q_last + causal_shift) // causal_block + 1) * causal_block)
        full = tl.minimum(hi, ((q_first + causal_shift) // causal_block + 1) * causal_block)
    mid = lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N

    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kl, stride_vl, stride_ml, row_lim, offs_d,
        d_ok, lo, mid, Lk, qk_scale,
        HAS_MASK, False, CAUSAL, EVEN_D, PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kl, stride_vl, stride_ml, row_lim, offs_d,
        d_ok, mid, hi, Lk, qk_scale,
        HAS_MASK, True, CAUSAL, EVEN_D, PRECISION, BLOCK_N,
    )  # fmt: skip

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    split_off = pid_s.to(tl.int64)
    o_ptrs = (
        Out + split_off * stride_os + b * stride_ob
        + qi[:, None] * stride_ol + hq[:, None] * stride_oh + offs_d[None, :]
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = Lse + split_off * stride_ls + b * stride_lb + hq * stride_lh + qi * stride_ll
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    num_rows,
    num_splits,
    Lq,
    Hq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Combine per-split normalised outputs by their log-sum-exp.

    PartOut fp32 ``[S, R, D]`` and PartLse fp32 ``[S, R]`` with rows ``R = B * Lq * Hq`` in
    ``[B, Lq, Hq]`` order (contiguous); Out ``[B, Lq, Hq, D]`` contiguous, Lse ``[B, Hq, Lq]``.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    rd_mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = offs_r.to(tl.int64)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(PartLse + s * num_rows + rows64, mask=r_ok, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(PartLse + s * num_rows + rows64, mask=r_ok, other=float("-inf")) - m_sub)
        part_ptrs = PartOut + (s * num_rows + rows64)[:, None] * HEAD_DIM + offs_d[None, :]
        acc += w[:, None] * tl.load(part_ptrs, mask=rd_mask, other=0.0)
        w_sum += w
    seen = w_sum > 0.0
    out = acc / tl.where(seen, w_sum, 1.0)[:, None]
    lse = tl.where(seen, m_sub + tl.log(tl.where(seen, w_sum, 1.0)), float("-inf"))
    tl.store(Out + rows64[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=rd_mask)
    h = offs_r % Hq
    bl = offs_r // Hq  # b * Lq + l
    lse_rows = (bl // Lq).to(tl.int64) * Hq * Lq + h * Lq + bl % Lq
    tl.store(Lse + lse_rows, lse, mask=r_ok)


# --------------------------------------------------------------------------- configurations


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# (regime, head-dim class) -> autotune candidates for fp16/bf16. Each fits sm_80's shared memory
# and spills at most ~100 bytes on sm_90 with causal + key mask (ptxas -v), the heaviest variant.
# "long": many rows per (batch, kv head), compute-bound; "short": few rows over many keys,
# memory-bound (wide key tiles; BLOCK_M 128 reads K/V once for a 32-query block x GQA group 4,
# BLOCK_M 32 wastes no rows on a 32-query block without GQA).
_CONFIGS_16BIT = {
    ("long", "d64"): [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 3)],
    ("long", "d128"): [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(64, 64, 4, 3)],
    ("long", "d256"): [_config(64, 32, 8, 3), _config(64, 64, 8, 2), _config(128, 64, 8, 2)],
    ("short", "d64"): [_config(64, 128, 4, 3), _config(128, 64, 4, 3), _config(32, 128, 4, 3)],
    ("short", "d128"): [_config(64, 128, 8, 3), _config(128, 64, 8, 3), _config(32, 64, 4, 4)],
    ("short", "d256"): [_config(64, 32, 8, 3), _config(64, 64, 8, 2), _config(32, 32, 4, 3)],
}
# fp32 runs 3xTF32 dots (about fp32 accuracy on tensor cores); exact "ieee" dots spill kilobytes.
_CONFIGS_32BIT = {
    "d64": [_config(32, 32, 8, 2)],
    "d128": [_config(32, 32, 8, 2)],
    "d256": [_config(16, 32, 8, 2)],
}
# Under the interpreter: few, large-ish programs (its cost is per program and per op).
_INTERPRETER_CONFIG = _config(32, 32, 4, 1)
_MAX_BLOCK_N = 128  # split sizes are multiples of it, so every BLOCK_N divides them
HEAD_DIMS = (32, 64, 96, 128, 256)  # as the op's contract (hybridkernels.ops.HEAD_DIMS)


def _head_dim_class(head_dim: int) -> str:
    return "d64" if head_dim <= 64 else ("d128" if head_dim <= 128 else "d256")


def attention_configs(regime: str, head_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    """Autotune candidates of :func:`_attn_fwd_kernel` for one regime, head dim and dtype."""
    if dtype == torch.float32:
        return _CONFIGS_32BIT[_head_dim_class(head_dim)]
    return _CONFIGS_16BIT[(regime, _head_dim_class(head_dim))]


# One autotuner per (regime, head dim, 16-bit/32-bit dtype), keyed on bucketed row and key counts,
# causal and mask flags (the dtype is part of every key): tuning runs once per shape class, on the
# first call of that class, so call once before capturing a CUDA graph.
_AUTOTUNE_KEY = ["ROWS_CLASS", "KEYS_CLASS", "HEAD_DIM", "CAUSAL", "HAS_MASK"]


@functools.cache
def _tuned_kernel(regime: str, head_dim: int, dtype: torch.dtype):
    return triton.autotune(configs=attention_configs(regime, head_dim, dtype), key=_AUTOTUNE_KEY)(
        _attn_fwd_kernel
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _length_class(n: int) -> int:
    """Power-of-two bucket of a length, for the autotune key."""
    return triton.next_power_of_2(max(1, min(n, 1 << 16)))


def plan_splits(Lk: int, programs_per_split: int, target_programs: int) -> tuple[int, int]:
    """``(num_splits, split_size)``: split the keys when the row blocks alone launch fewer than
    ``target_programs`` programs, keeping at least 256 keys per split. ``split_size`` is a
    multiple of the largest key tile, so every tile lies in one split."""
    splits = 1
    if programs_per_split < target_programs:
        splits = min(triton.cdiv(target_programs, programs_per_split), max(1, Lk // 256), 128)
    split_size = triton.cdiv(triton.cdiv(Lk, splits), _MAX_BLOCK_N) * _MAX_BLOCK_N
    return triton.cdiv(Lk, split_size), split_size


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
):
    """Triton forward of :func:`hybridkernels.ops.attention` (same arguments,
    already validated by the op). ``num_splits`` forces the number of key splits (default: chosen
    from the shape and the GPU's SM count).

    Returns ``out [B, Lq, Hq, D]`` (contiguous, q's dtype), and with ``return_lse`` also
    ``lse [B, Hq, Lq]`` float32.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    rows = Lq * group
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    interpret = triton_interpreting()
    regime = "short" if rows <= 256 and Lk >= 4 * Lq else "long"

    if num_splits is None:
        # Memory-bound short blocks want ~2 programs per SM in flight; long rows one full wave.
        sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 1
        block_m, waves = (64, 2) if regime == "short" else (128, 1)
        num_splits, split_size = plan_splits(Lk, triton.cdiv(rows, block_m) * B * Hkv, waves * sm_count)
    else:
        num_splits = max(1, min(int(num_splits), triton.cdiv(Lk, _MAX_BLOCK_N)))
        split_size = triton.cdiv(triton.cdiv(Lk, num_splits), _MAX_BLOCK_N) * _MAX_BLOCK_N
        num_splits = triton.cdiv(Lk, split_size)

    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        k_out, k_lse = out, lse
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, *lse.stride())
    else:  # partials: out [S, B, Lq, Hq, D], lse [S, B, Lq, Hq] (rows in out's order)
        k_out = torch.empty((num_splits, B, Lq, Hq, D), dtype=torch.float32, device=q.device)
        k_lse = torch.empty((num_splits, B, Lq, Hq), dtype=torch.float32, device=q.device)
        o_strides = k_out.stride()[:4]
        ls = k_lse.stride()
        l_strides = (ls[0], ls[1], ls[3], ls[2])
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)
        m_strides = mask.stride()
    else:
        mask, m_strides = q, (0, 0)  # never read

    args = (
        q, k, v, mask, k_out, k_lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides, *o_strides, *l_strides,
        Lq, Lk, Hkv, group, 1 if block_causal is None else int(block_causal), split_size, scale,
        _length_class(rows), _length_class(min(split_size, Lk)),
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=D,
        BLOCK_D=triton.next_power_of_2(D),
        CAUSAL=bool(causal) or block_causal is not None,
        HAS_MASK=key_padding_mask is not None,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
    )
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if interpret:
            cfg = _INTERPRETER_CONFIG
            grid = (triton.cdiv(rows, cfg.kwargs["BLOCK_M"]), B * Hkv, num_splits)
            _attn_fwd_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps)
        else:

            def grid(cfg):
                return (triton.cdiv(rows, cfg["BLOCK_M"]), B * Hkv, num_splits)

            _tuned_kernel(regime, D, q.dtype)[grid](*args, **meta)
        if num_splits > 1:
            n_rows = B * Lq * Hq
            block_d = triton.next_power_of_2(D)
            block_r = max(1, 2048 // block_d)
            _merge_splits_kernel[(triton.cdiv(n_rows, block_r),)](
                k_out, k_lse, out, lse, n_rows, num_splits, Lq, Hq,
                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4,
            )  # fmt: skip
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- compile cases

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _attn_signature(dtype: torch.dtype, out_dtype: str) -> dict[str, str]:
    ptr = "*" + _TRITON_DTYPES[dtype]
    sig = {"Q": ptr, "K": ptr, "V": ptr, "KeyMask": "*u8", "Out": "*" + out_dtype, "Lse": "*fp32"}
    for name in _attn_fwd_kernel.arg_names[6:]:
        sig[name] = "i32"
    sig["sm_scale"] = "fp32"
    for name in ("HEAD_DIM", "BLOCK_D", "CAUSAL", "HAS_MASK", "PRECISION", "BLOCK_M", "BLOCK_N"):
        sig[name] = "constexpr"
    return sig


@compile_cases
def _compile_cases():
    """Every autotune config x dtype x head dim of the attention kernel (causal + key mask: the
    superset of the masking code; the causal block size ``causal_block`` is a runtime i32, so these
    compiles are the ``block_causal=b`` kernels too, ``causal=True`` being ``b = 1``; output in the
    input dtype; split partials differ only in storing fp32), and the split merge per output dtype
    and head dim."""
    for dtype, name in _TRITON_DTYPES.items():
        hopper = ("wgmma",) if dtype != torch.float32 else ()
        for head_dim in HEAD_DIMS:
            seen = set()
            for regime in ("long", "short"):
                for cfg in attention_configs(regime, head_dim, dtype):
                    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                    if (bm, bn, cfg.num_warps, cfg.num_stages) in seen:
                        continue
                    seen.add((bm, bn, cfg.num_warps, cfg.num_stages))
                    yield CompileCase(
                        kernel=_attn_fwd_kernel,
                        signature=_attn_signature(dtype, name),
                        constexprs={
                            "HEAD_DIM": head_dim,
                            "BLOCK_D": triton.next_power_of_2(head_dim),
                            "CAUSAL": True,
                            "HAS_MASK": True,
                            "PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
                            "BLOCK_M": bm,
                            "BLOCK_N": bn,
                        },
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        name=f"attn_fwd[{name},D={head_dim},{regime},BM={bm},BN={bn},"
                        f"w={cfg.num_warps},s={cfg.num_stages}]",
                        hopper_features=hopper if bm >= 64 else (),
                    )
            block_d = triton.next_power_of_2(head_dim)
            yield CompileCase(
                kernel=_merge_splits_kernel,
                signature={
                    "PartOut": "*fp32",
                    "PartLse": "*fp32",
                    "Out": "*" + name,
                    "Lse": "*fp32",
                    "num_rows": "i32",
                    "num_splits": "i32",
                    "Lq": "i32",
                    "Hq": "i32",
                    "HEAD_DIM": "constexpr",
                    "BLOCK_D": "constexpr",
                    "BLOCK_R": "constexpr",
                },  # fmt: skip
                constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_R": max(1, 2048 // block_d)},
                num_warps=4,
                num_stages=1,
                name=f"attn_merge_splits[{name},D={head_dim}]",
            )
