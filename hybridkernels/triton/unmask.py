"""Triton backend of ``unmask_step``: argmax, confidence, Gumbel sampling and the commit in two passes.

1. Partials, one program per (masked row or tile of masked rows, vocabulary split): a single pass
   over the split in vocabulary tiles keeps per row the running max, its first index (torch.argmax's
   tie rule), the sum of ``exp(score - max)`` and, at temperature > 0, the max / index / raw score
   of ``score / T + Gumbel``. The scores come either from ``logits [B, Lr, V]``
   (:func:`_logits_partials_kernel`) or from ``hidden [B, Lr, d] @ lm_head[V, d].T`` computed tile
   by tile with ``tl.dot`` (:func:`_lm_head_partials_kernel`); there no ``[B, Lr, V]`` tensor exists.
2. Commit (:func:`_commit_kernel`), one program per (sequence, block of rows): merges the splits of
   each row into its candidate and confidence, ranks the sequence's masked rows (confidence
   descending, lowest position first on ties), commits ``rank < num_transfer[b]`` or the threshold
   rule, and writes ``x`` in place.

Randomness is counter-based (see :func:`_draw_seed`): results do not depend on the tiling.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..common import UnmaskResult, triton_interpreting
from .registry import CompileCase, compile_cases

# Logits path: a program streams one row's vocabulary split in BLOCK_V tiles.
LOGITS_CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
]
LOGITS_SPLIT_ALIGN = 4096  # splits are whole numbers of the largest BLOCK_V

# Fused path: vocabulary is the MMA's M side (BLOCK_V >= 64, so Hopper uses wgmma), masked rows are
# its N side (swap-AB: few rows at batch 1, up to BLOCK_R at large batch).
LM_HEAD_CONFIGS = [
    triton.Config({"BLOCK_V": 128, "BLOCK_R": 16, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_V": 128, "BLOCK_R": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_V": 128, "BLOCK_R": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_V": 128, "BLOCK_R": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_V": 256, "BLOCK_R": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# fp32 operands (ieee dot, no tensor cores) take 4 bytes per element: shallower K tiles and stages.
LM_HEAD_CONFIGS_FP32 = [
    triton.Config({"BLOCK_V": 128, "BLOCK_R": r, "BLOCK_K": 32}, num_warps=8 if r == 128 else 4, num_stages=2)
    for r in (16, 32, 64, 128)
]
LM_HEAD_SPLIT_ALIGN = 256
LM_HEAD_ROWS_PER_TILE_ESTIMATE = 64  # to size the split count before the autotuner picks BLOCK_R

COMMIT_BLOCK = 32  # rows per commit program and per step of its ranking loop
COMMIT_WARPS = 4
PROGRAMS_PER_SM = 2

# Confidence rules (``remasking``): the candidate's probability, top-1 minus top-2 probability
# (Dream's ``topk_margin``), ``sum(p log p)`` (Dream's ``entropy``, negative entropy).
RULE_PROBABILITY: tl.constexpr = tl.constexpr(0)
RULE_MARGIN: tl.constexpr = tl.constexpr(1)
RULE_ENTROPY: tl.constexpr = tl.constexpr(2)
RULES = {"low_confidence": 0, "random": 0, "topk_margin": 1, "entropy": 2}

# Small fixed configurations for the CPU interpreter (it does not autotune).
INTERPRETER_LOGITS_CONFIG = {"BLOCK_V": 64}
INTERPRETER_LM_HEAD_CONFIG = {"BLOCK_V": 32, "BLOCK_R": 16, "BLOCK_K": 32}


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ban(scores, offs_v, banned_ptr, n_banned):
    """Set the scores of the ``n_banned`` token ids at ``banned_ptr`` to -inf (vocab on axis 0)."""
    for i in range(n_banned):
        token = tl.load(banned_ptr + i)
        scores = tl.where(offs_v[:, None] == token, float("-inf"), scores)
    return scores


@triton.jit
def _fold_tile(
    scores, v0, offs_v, rows, m, s, arg, gmax, garg, glogit, aux, seed, inv_temp, V,
    SAMPLE: tl.constexpr, RULE: tl.constexpr,
):  # fmt: skip
    """Fold a ``[BLOCK_V, R]`` tile (vocabulary on axis 0, -inf outside it) into per-row running stats.

    ``m``/``arg``: max and its first index; ``s``: sum of ``exp(score - m)``; with ``SAMPLE``,
    ``gmax``/``garg``/``glogit``: max of ``score * inv_temp + Gumbel``, its index and raw score.
    ``aux`` (the confidence rule's): ``RULE_MARGIN`` the second largest score (the max again when
    it occurs twice); ``RULE_ENTROPY`` ``sum(exp(score - m) * (score - m))``.
    """
    # NaN scores follow torch.argmax (NaN is the maximum, its first index wins) and make the row's
    # softmax NaN: a row that has seen a NaN keeps m = NaN (sticky) and arg = its first NaN. The
    # maxima below only ever see NaN-free scores, whatever the backend's NaN rule of tl.max.
    is_nan = scores != scores
    t_nan_arg = tl.min(tl.where(is_nan, (offs_v - v0)[:, None], 2**30), axis=0)
    t_has_nan = t_nan_arg < 2**30
    seen_nan = m != m
    prev_arg = arg
    clean = tl.where(is_nan, float("-inf"), scores)
    t_max, t_arg = tl.max(clean, axis=0, return_indices=True)
    m_clean = tl.where(seen_nan, float("-inf"), m)
    new_m = tl.maximum(m_clean, t_max)
    if RULE == RULE_MARGIN:
        t_second = tl.max(tl.where((offs_v - v0)[:, None] == t_arg[None, :], float("-inf"), clean), axis=0)
        aux = tl.maximum(tl.minimum(m_clean, t_max), tl.maximum(aux, t_second))
    arg = tl.where(t_max > m_clean, v0 + t_arg, arg)  # strict: an earlier tile keeps a tie
    arg = tl.where(t_has_nan, v0 + t_nan_arg, arg)
    arg = tl.where(seen_nan, prev_arg, arg)
    ref = tl.where(new_m == float("-inf"), 0.0, new_m)
    if RULE == RULE_ENTROPY:
        aux = _entropy_fold(aux, s, m_clean, ref, scores)
    s = s * tl.exp(m_clean - ref) + tl.sum(tl.exp(scores - ref[None, :]), axis=0)
    now_nan = seen_nan | t_has_nan
    new_m = tl.where(now_nan, float("nan"), new_m)
    s = tl.where(now_nan, float("nan"), s)
    if SAMPLE:
        u = tl.rand(seed, rows[None, :].to(tl.int64) * V + offs_v[:, None])
        perturbed = clean * inv_temp - tl.log(-tl.log(u))
        t_g, t_garg = tl.max(perturbed, axis=0, return_indices=True)
        hit = (offs_v - v0)[:, None] == t_garg[None, :]
        t_logit = tl.max(tl.where(hit, clean, float("-inf")), axis=0)
        better = (t_g > gmax) & ~now_nan
        garg = tl.where(better, v0 + t_garg, garg)
        glogit = tl.where(better, t_logit, glogit)
        gmax = tl.maximum(gmax, t_g)
        # NaN / T + noise is NaN: the first NaN is the sample (torch.argmax), as above.
        garg = tl.where(t_has_nan & ~seen_nan, v0 + t_nan_arg, garg)
        glogit = tl.where(now_nan, float("nan"), glogit)
    return new_m, s, arg, gmax, garg, glogit, aux


@triton.jit
def _rescale_entropy(aux, s, m_old, ref):
    """``sum(e^(l - m_old) (l - m_old))`` (``aux``, with ``s = sum e^(l - m_old)``) relative to
    ``ref >= m_old``: ``e^(m_old - ref) (aux + (m_old - ref) s)``; 0 for an empty sum."""
    scale = tl.exp(m_old - ref)
    return tl.where(scale > 0, scale * (aux + (m_old - ref) * s), 0.0)


@triton.jit
def _entropy_fold(aux, s, m_old, ref, scores):
    """The entropy partial after folding the tile ``scores [BLOCK_V, R]`` at the new max ``ref``."""
    e = tl.exp(scores - ref[None, :])
    d = tl.where(e > 0, scores - ref[None, :], 0.0)  # no 0 * -inf
    return _rescale_entropy(aux, s, m_old, ref) + tl.sum(e * d, axis=0)


@triton.jit
def _store_partials(
    part_f_ptr, part_i_ptr, idx, mask, n_part, m, s, arg, gmax, garg, glogit, aux,
    SAMPLE: tl.constexpr, RULE: tl.constexpr,
):  # fmt: skip
    """Partials layout: float32 ``[2, 4 or 5, n_part]`` (max, sumexp[, gumbel max, its logit]
    [, the rule's aux at row 4]) and int32 ``[1 or 2, n_part]`` (argmax[, gumbel argmax], global
    token ids); ``idx = row * n_splits + split``."""
    tl.store(part_f_ptr + idx, m, mask=mask)
    tl.store(part_f_ptr + n_part + idx, s, mask=mask)
    tl.store(part_i_ptr + idx, arg, mask=mask)
    if SAMPLE:
        tl.store(part_f_ptr + 2 * n_part + idx, gmax, mask=mask)
        tl.store(part_f_ptr + 3 * n_part + idx, glogit, mask=mask)
        tl.store(part_i_ptr + n_part + idx, garg, mask=mask)
    if RULE != RULE_PROBABILITY:
        tl.store(part_f_ptr + 4 * n_part + idx, aux, mask=mask)


# ----------------------------------------------------------------------------------------------
# Pass 1a: partials from logits
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_partials_kernel(
    logits_ptr,
    committable_ptr,
    banned_ptr,
    seed_ptr,
    part_f_ptr,
    part_i_ptr,
    Lr,
    V,
    n_banned,
    split_len,
    n_splits,
    n_part,
    stride_lb,
    stride_ll,
    stride_lv,
    inv_temp,
    SAMPLE: tl.constexpr,
    RULE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)  # b * Lr + r
    split = tl.program_id(1)
    if tl.load(committable_ptr + row) == 0:
        return
    b = row // Lr
    base = logits_ptr + b.to(tl.int64) * stride_lb + (row - b * Lr).to(tl.int64) * stride_ll
    rows = tl.full([1], row, tl.int32)
    seed = tl.load(seed_ptr) if SAMPLE else 0
    v_start = split * split_len
    v_end = tl.minimum(v_start + split_len, V)

    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    arg = tl.zeros([1], tl.int32)
    gmax = tl.full([1], float("-inf"), tl.float32)
    garg = tl.zeros([1], tl.int32)
    glogit = tl.full([1], float("-inf"), tl.float32)
    aux = tl.full([1], float("-inf") if RULE == RULE_MARGIN else 0.0, tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        scores = tl.load(
            base + offs_v[:, None].to(tl.int64) * stride_lv, mask=offs_v[:, None] < v_end, other=float("-inf")
        ).to(tl.float32)
        scores = _ban(scores, offs_v, banned_ptr, n_banned)
        m, s, arg, gmax, garg, glogit, aux = _fold_tile(
            scores, v0, offs_v, rows, m, s, arg, gmax, garg, glogit, aux, seed, inv_temp, V, SAMPLE, RULE
        )
    idx = rows * n_splits + split
    _store_partials(
        part_f_ptr, part_i_ptr, idx, rows >= 0, n_part, m, s, arg, gmax, garg, glogit, aux, SAMPLE, RULE
    )


_logits_partials_tuned = triton.autotune(LOGITS_CONFIGS, key=["V", "split_len", "SAMPLE", "RULE"])(
    _logits_partials_kernel
)


# ----------------------------------------------------------------------------------------------
# Pass 1b: partials from hidden states and the LM head (fused: no [B, Lr, V] tensor)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lm_head_partials_kernel(
    hidden_ptr,
    weight_ptr,
    rows_ptr,
    n_rows_ptr,
    banned_ptr,
    seed_ptr,
    part_f_ptr,
    part_i_ptr,
    Lr,
    V,
    D,
    n_banned,
    split_len,
    n_splits,
    n_part,
    vocab_start,
    V_local,
    stride_hb,
    stride_hl,
    stride_wv,
    inv_temp,
    SAMPLE: tl.constexpr,
    RULE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)  # masked rows, gathered to the front of rows_ptr
    if pid_r * BLOCK_R >= n_rows:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    rows = tl.load(rows_ptr + offs_r, mask=row_ok, other=0)  # b * Lr + r
    b = rows // Lr
    h_rows = hidden_ptr + b.to(tl.int64) * stride_hb + (rows - b * Lr).to(tl.int64) * stride_hl
    offs_k = tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr) if SAMPLE else 0
    v_start = split * split_len  # local: row v of lm_head is token vocab_start + v
    v_end = tl.minimum(v_start + split_len, V_local)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    gmax = tl.full([BLOCK_R], float("-inf"), tl.float32)
    garg = tl.zeros([BLOCK_R], tl.int32)
    glogit = tl.full([BLOCK_R], float("-inf"), tl.float32)
    aux = tl.full([BLOCK_R], float("-inf") if RULE == RULE_MARGIN else 0.0, tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        w_ptrs = weight_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_k[None, :]
        h_ptrs = h_rows[None, :] + offs_k[:, None]
        acc = tl.zeros([BLOCK_V, BLOCK_R], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = offs_k < D - k0
            w = tl.load(w_ptrs, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            h = tl.load(h_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            acc = tl.dot(w, h, acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            h_ptrs += BLOCK_K
        scores = tl.where(v_ok[:, None], acc, float("-inf"))
        # Global token ids from here on: the ban list, the argmax and the Philox counter row * V + id.
        g_offs = offs_v + vocab_start
        scores = _ban(scores, g_offs, banned_ptr, n_banned)
        m, s, arg, gmax, garg, glogit, aux = _fold_tile(
            scores, v0 + vocab_start, g_offs, rows, m, s, arg, gmax, garg, glogit, aux, seed, inv_temp, V,
            SAMPLE, RULE,
        )  # fmt: skip
    idx = rows * n_splits + split
    _store_partials(
        part_f_ptr, part_i_ptr, idx, row_ok, n_part, m, s, arg, gmax, garg, glogit, aux, SAMPLE, RULE
    )


_LM_HEAD_KEY = ["V", "V_local", "D", "split_len", "n_part", "SAMPLE", "RULE"]
_lm_head_partials_tuned = {
    False: triton.autotune(LM_HEAD_CONFIGS, key=_LM_HEAD_KEY)(_lm_head_partials_kernel),
    True: triton.autotune(LM_HEAD_CONFIGS_FP32, key=_LM_HEAD_KEY)(_lm_head_partials_kernel),
}  # by "operands are fp32"


def lm_head_configs(dtype: torch.dtype) -> list:
    """The fused kernel's autotune configurations for ``dtype`` operands."""
    return LM_HEAD_CONFIGS_FP32 if dtype == torch.float32 else LM_HEAD_CONFIGS


# ----------------------------------------------------------------------------------------------
# Pass 2: merge the splits, rank, commit
# ----------------------------------------------------------------------------------------------


@triton.jit
def _merge_splits(
    part_f_ptr,
    part_i_ptr,
    rows,
    ok,
    n_splits,
    n_part,
    deferred_ptr,
    n_deferred,
    seed,
    V,
    SAMPLE: tl.constexpr,
    RANDOM: tl.constexpr,
    RULE: tl.constexpr,
):
    """Candidate token and confidence of ``rows`` from their per-split partials (splits in
    vocabulary order, so a strict ``>`` keeps the first index on ties, as torch.argmax)."""
    m = tl.full(rows.shape, float("-inf"), tl.float32)
    s = tl.zeros(rows.shape, tl.float32)
    arg = tl.zeros(rows.shape, tl.int32)
    gmax = tl.full(rows.shape, float("-inf"), tl.float32)
    garg = tl.zeros(rows.shape, tl.int32)
    glogit = tl.full(rows.shape, float("-inf"), tl.float32)
    nan = tl.zeros(rows.shape, tl.int1)  # a split saw a NaN score (m = NaN, arg = its first NaN)
    aux = tl.full(rows.shape, float("-inf") if RULE == RULE_MARGIN else 0.0, tl.float32)
    for split in range(n_splits):
        idx = rows * n_splits + split
        p_m = tl.load(part_f_ptr + idx, mask=ok, other=float("-inf"))
        p_s = tl.load(part_f_ptr + n_part + idx, mask=ok, other=0.0)
        p_arg = tl.load(part_i_ptr + idx, mask=ok, other=0)
        p_nan = p_m != p_m
        p_m = tl.where(p_nan, float("-inf"), p_m)
        new_m = tl.maximum(m, p_m)
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)
        if RULE == RULE_MARGIN:
            p_aux = tl.load(part_f_ptr + 4 * n_part + idx, mask=ok, other=float("-inf"))
            p_aux = tl.where(p_aux != p_aux, float("-inf"), p_aux)
            aux = tl.maximum(tl.minimum(m, p_m), tl.maximum(aux, p_aux))
        if RULE == RULE_ENTROPY:
            p_aux = tl.load(part_f_ptr + 4 * n_part + idx, mask=ok, other=0.0)
            aux = _rescale_entropy(aux, s, m, ref) + _rescale_entropy(p_aux, p_s, p_m, ref)
        s = s * tl.exp(m - ref) + p_s * tl.exp(p_m - ref)
        arg = tl.where(nan, arg, tl.where(p_nan | (p_m > m), p_arg, arg))
        if SAMPLE:
            p_g = tl.load(part_f_ptr + 2 * n_part + idx, mask=ok, other=float("-inf"))
            p_logit = tl.load(part_f_ptr + 3 * n_part + idx, mask=ok, other=float("-inf"))
            p_garg = tl.load(part_i_ptr + n_part + idx, mask=ok, other=0)
            better = tl.where(nan, False, p_nan | (p_g > gmax))
            garg = tl.where(better, p_garg, garg)
            glogit = tl.where(better, p_logit, glogit)
            gmax = tl.maximum(gmax, p_g)
        m = new_m
        nan = nan | p_nan
    # The softmax of a row with a NaN, a +inf (inf - inf) or only -inf scores is NaN (torch).
    bad = nan | (m == float("inf")) | (m == float("-inf"))
    # Rows that were not loaded (ok False) have m = -inf and s = 0: keep them NaN-free.
    m = tl.where(ok, m, 0.0)
    s = tl.where(ok, s, 1.0)
    if SAMPLE:
        candidate = garg
        confidence = tl.exp(tl.where(ok, glogit, 0.0) - m) / s
    else:
        candidate = arg
        confidence = 1.0 / s  # exp(max - max) / sumexp
    if RULE == RULE_MARGIN:  # (exp(0) - exp(second - max)) / sumexp
        confidence = (1.0 - tl.exp(aux - m)) / s
    if RULE == RULE_ENTROPY:  # sum p log p = sum e^(l-m) (l-m) / s - log s
        confidence = aux / s - tl.log(s)
    confidence = tl.where(ok & bad, float("nan"), confidence)
    if RANDOM:
        _, word, _, _ = tl.randint4x(seed, rows.to(tl.int64) * V)
        confidence = tl.uint_to_uniform_float(word)
    for i in range(n_deferred):
        confidence = tl.where(candidate == tl.load(deferred_ptr + i), float("-inf"), confidence)
    return candidate, confidence


@triton.jit
def _window_rows(
    committable_ptr, part_f_ptr, part_i_ptr, deferred_ptr, b, offs, Lr, n_splits, n_part, n_deferred, seed, V,
    SAMPLE: tl.constexpr, RANDOM: tl.constexpr, RULE: tl.constexpr,
):  # fmt: skip
    """Window rows ``offs`` of sequence ``b``: committable flag, candidate, and ranking confidence
    (-inf unless committable)."""
    ok = offs < Lr
    rows = b * Lr + offs
    committable = (tl.load(committable_ptr + rows, mask=ok, other=0) != 0) & ok
    candidate, confidence = _merge_splits(
        part_f_ptr,
        part_i_ptr,
        rows,
        committable,
        n_splits,
        n_part,
        deferred_ptr,
        n_deferred,
        seed,
        V,
        SAMPLE,
        RANDOM,
        RULE,
    )
    return committable, candidate, tl.where(committable, confidence, float("-inf"))


@triton.jit
def _commit_kernel(
    x_ptr,
    committable_ptr,
    num_transfer_ptr,
    part_f_ptr,
    part_i_ptr,
    deferred_ptr,
    seed_ptr,
    tokens_ptr,
    confidence_ptr,
    committed_ptr,
    Lr,
    V,
    start,
    n_splits,
    n_part,
    n_deferred,
    stride_xb,
    stride_xl,
    threshold,
    SAMPLE: tl.constexpr,
    RANDOM: tl.constexpr,
    RULE: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok_i = offs_i < Lr
    rows_i = b * Lr + offs_i
    seed = tl.load(seed_ptr) if (SAMPLE or RANDOM) else 0
    com_i, cand_i, conf_i = _window_rows(
        committable_ptr, part_f_ptr, part_i_ptr, deferred_ptr, b, offs_i, Lr,
        n_splits, n_part, n_deferred, seed, V, SAMPLE, RANDOM, RULE,
    )  # fmt: skip

    # rank = number of masked rows ahead: higher confidence, or equal and at a lower position.
    rank = tl.zeros([BLOCK], tl.int32)
    for j0 in range(0, Lr, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        com_j, _, conf_j = _window_rows(
            committable_ptr, part_f_ptr, part_i_ptr, deferred_ptr, b, offs_j, Lr,
            n_splits, n_part, n_deferred, seed, V, SAMPLE, RANDOM, RULE,
        )  # fmt: skip
        # NaN confidences rank first (torch.sort, descending), among themselves by position.
        nan_i = (conf_i != conf_i)[:, None]
        nan_j = (conf_j != conf_j)[None, :]
        lower = offs_j[None, :] < offs_i[:, None]
        ahead = (conf_j[None, :] > conf_i[:, None]) | ((conf_j[None, :] == conf_i[:, None]) & lower)
        ahead = tl.where(nan_i, nan_j & lower, ahead | nan_j)
        rank += tl.sum((ahead & com_j[None, :]).to(tl.int32), axis=1)

    if USE_THRESHOLD:
        chosen = (conf_i >= threshold) | (rank == 0)
    else:
        chosen = rank < tl.load(num_transfer_ptr + b).to(tl.int32)
    chosen = chosen & com_i

    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + (start + offs_i).to(tl.int64) * stride_xl
    current = tl.load(x_ptrs, mask=ok_i, other=0)
    tokens = tl.where(com_i, cand_i.to(tl.int64), current)
    tl.store(x_ptrs, tokens, mask=chosen)
    tl.store(tokens_ptr + rows_i, tokens, mask=ok_i)
    tl.store(confidence_ptr + rows_i, conf_i, mask=ok_i)
    tl.store(committed_ptr + rows_i, chosen.to(tl.uint8), mask=ok_i)


# ----------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _token_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The token ids as an int32 device tensor (cached: no host-to-device copy per step)."""
    return torch.tensor(ids or (0,), dtype=torch.int32, device=device)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few splits, so CPU tests exercise the merge


def _split_length(V: int, programs_per_split: int, target: int, align: int) -> int:
    """Vocabulary entries per split: enough splits that ``programs_per_split * splits`` fills the
    device, each a multiple of ``align``."""
    n = max(1, min(triton.cdiv(target, max(programs_per_split, 1)), triton.cdiv(V, align)))
    return triton.cdiv(triton.cdiv(V, n), align) * align


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as an int64 ``[1]`` tensor on ``device``, drawn on the generator's device.

    The Gumbel noise of (row, token) is ``tl.rand(seed, row * V + token)`` and the ``random``
    remasking draw of a row is another Philox word of the counter ``row * V``, so results do not
    depend on the tiling or the split. Drawn on the device (no host sync), which keeps the step
    capturable in a CUDA graph."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


def _check_shard(vocab_start, V_local: int, V, chunk, exchange) -> None:
    """``ValueError`` / ``TypeError`` naming the vocabulary-shard argument that is out of range."""
    for name, value in (("vocab_start", vocab_start), ("vocab_size", V), ("vocab_chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"unmask_step: {name} must be an int, got {type(value).__name__}")
    if not 0 <= vocab_start <= vocab_start + V_local <= V:
        raise ValueError(
            f"unmask_step: lm_head's rows [vocab_start, vocab_start + V_local) = [{vocab_start}, "
            f"{vocab_start + V_local}) are outside the vocabulary [0, vocab_size = {V})"
        )
    if V >= 2**31:
        raise ValueError(f"unmask_step: vocab_size = {V} does not fit the kernel's int32 token ids")
    if chunk < max(V_local, 1):
        raise ValueError(f"unmask_step: vocab_chunk = {chunk} is shorter than the shard's {V_local} rows")
    if exchange is not None and not callable(exchange):
        raise TypeError(f"unmask_step: exchange must be callable, got {type(exchange).__name__}")


def _exchanged(exchange, part_f, part_i, n_rows: int, n_splits: int):
    """``exchange``'s partials of the whole vocabulary, checked against the commit kernel's layout."""
    out = exchange(part_f, part_i, n_rows, n_splits)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError("unmask_step: exchange must return (part_f, part_i, n_splits)")
    new_f, new_i, total = out
    if isinstance(total, bool) or not isinstance(total, int) or total < n_splits:
        raise ValueError(
            f"unmask_step: exchange returned n_splits = {total!r}, fewer than the shard's {n_splits}"
        )
    for name, new, old in (("part_f", new_f, part_f), ("part_i", new_i, part_i)):
        shape = (old.shape[0], n_rows * total)
        if not isinstance(new, torch.Tensor) or new.dtype != old.dtype or new.device != old.device:
            raise TypeError(f"unmask_step: exchange's {name} must be a {old.dtype} tensor on {old.device}")
        if tuple(new.shape) != shape or not new.is_contiguous():
            raise ValueError(
                f"unmask_step: exchange's {name} must be a contiguous {list(shape)} tensor "
                f"([fields, n_rows * n_splits]), got {list(new.shape)}"
                + ("" if new.is_contiguous() else " (not contiguous)")
            )
    return new_f, new_i, total


def unmask_step(
    x: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
    mask_id: int,
    start: int = 0,
    num_transfer: torch.Tensor | None = None,
    threshold: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    banned_token_ids=(),
    deferred_token_ids=(),
    generator: torch.Generator | None = None,
    config: dict | None = None,
    split_len: int | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    vocab_chunk: int | None = None,
    exchange: Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, int]]
    | None = None,
) -> UnmaskResult:
    """Triton ``unmask_step`` (arguments already checked by :func:`hybridkernels.ops.unmask_step`).

    ``config`` (e.g. ``{"BLOCK_V": 64}``, or ``{"BLOCK_V", "BLOCK_R", "BLOCK_K"}`` for the fused
    path, plus optional ``num_warps``/``num_stages``) skips the autotuner; ``split_len`` (a multiple
    of ``BLOCK_V``) fixes the vocabulary split. Both are for tests and tuning.

    Vocabulary shard (fused path only; tensor parallel, see
    :mod:`hybridkernels.distributed.unmask`): ``lm_head [V_local, d]`` holds the global rows
    ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-token vocabulary (default: the
    whole vocabulary, ``vocab_start = 0``). Ban list, argmax and the Philox counters (Gumbel noise
    ``row * vocab_size + token``, the ``random`` draw ``row * vocab_size``) use global ids, so a
    shard draws exactly the noise one device draws for its tokens. ``vocab_chunk`` (default
    ``V_local``, ``>= V_local``) is the length the splits are sized from: ranks that pass the same
    one (e.g. ``ceil(V / N)``) and the same ``split_len`` (or none) have the same ``n_splits``.
    After the partial stage, ``exchange(part_f, part_i, n_rows, n_splits)`` gets this shard's
    partials (float32 ``[n_f, n_rows * n_splits]`` and int32 ``[n_i, n_rows * n_splits]``, column
    ``row * n_splits + split``, ``row = b * Lr + r``; rows that are not masked hold garbage) and
    returns ``(part_f, part_i, n_splits_total)``: the same fields for every split of the whole
    vocabulary, contiguous, column ``row * n_splits_total + split`` with the splits in vocabulary
    order (the first maximum wins ties). The commit stage then merges those, so every caller that
    exchanges the same partials commits the same tokens. Without ``exchange`` the shard is
    committed on its own (its tokens only).
    """
    device = x.device
    B, _ = x.shape
    fused = logits is None
    if fused:
        _, Lr, D = hidden.shape
        V_local = lm_head.shape[0]
        V = V_local if vocab_size is None else vocab_size
        chunk = V_local if vocab_chunk is None else vocab_chunk
        _check_shard(vocab_start, V_local, V, chunk, exchange)
    else:
        _, Lr, V = logits.shape
        chunk = V
        if (vocab_start, vocab_size, vocab_chunk, exchange) != (0, None, None, None):
            raise ValueError(
                "unmask_step: vocab_start, vocab_size, vocab_chunk and exchange shard the LM head's "
                "vocabulary: they need the fused path (hidden + lm_head), not logits"
            )
    n_rows = B * Lr
    sample = temperature > 0
    random = remasking == "random"
    rule = RULES[remasking]
    interpret = triton_interpreting()
    if config is None and interpret:
        config = INTERPRETER_LM_HEAD_CONFIG if fused else INTERPRETER_LOGITS_CONFIG

    if num_transfer is not None:
        num_transfer = num_transfer.contiguous()  # the commit kernel reads num_transfer[b] at b
    committable = x[:, start : start + Lr] == mask_id  # [B, Lr], a fresh contiguous tensor
    committable_u8 = committable.view(torch.uint8)
    banned = _token_tensor(tuple(banned_token_ids), device)
    deferred = _token_tensor(tuple(deferred_token_ids), device)
    seed = _draw_seed(generator, device) if (sample or random) else banned  # unused when neither
    inv_temp = 1.0 / temperature if sample else 1.0

    if split_len is None:
        if fused:
            align = LM_HEAD_SPLIT_ALIGN if config is None else config["BLOCK_V"]
            per_split = triton.cdiv(
                n_rows, LM_HEAD_ROWS_PER_TILE_ESTIMATE if config is None else config["BLOCK_R"]
            )
        else:
            align = LOGITS_SPLIT_ALIGN if config is None else config["BLOCK_V"]
            per_split = n_rows
        split_len = _split_length(chunk, per_split, _target_programs(device), align)
    n_splits = triton.cdiv(chunk, split_len)
    n_part = n_rows * n_splits
    part_f = torch.empty((5 if rule else 4 if sample else 2, n_part), dtype=torch.float32, device=device)
    part_i = torch.empty((2 if sample else 1, n_part), dtype=torch.int32, device=device)

    shared = dict(
        banned_ptr=banned,
        seed_ptr=seed,
        part_f_ptr=part_f,
        part_i_ptr=part_i,
        Lr=Lr,
        V=V,
        n_banned=len(banned_token_ids),
        split_len=split_len,
        n_splits=n_splits,
        n_part=n_part,
        inv_temp=inv_temp,
        SAMPLE=sample,
        RULE=rule,
        **({} if config is None else config),
    )
    # Triton launches on the current device, not the tensors': guard to x's.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if fused:
            flat = committable_u8.reshape(-1)
            rows = torch.sort(flat, descending=True, stable=True).indices.to(torch.int32)  # masked first
            fp32 = hidden.dtype == torch.float32
            kernel = _lm_head_partials_tuned[fp32] if config is None else _lm_head_partials_kernel
            kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), n_splits)](
                hidden_ptr=hidden,
                weight_ptr=lm_head,
                rows_ptr=rows,
                n_rows_ptr=flat.sum(dtype=torch.int32).reshape(1),
                D=D,
                vocab_start=vocab_start,
                V_local=V_local,
                stride_hb=hidden.stride(0),
                stride_hl=hidden.stride(1),
                stride_wv=lm_head.stride(0),
                DOT_PRECISION="ieee" if fp32 else "tf32",
                **shared,
            )
        else:
            kernel = _logits_partials_tuned if config is None else _logits_partials_kernel
            kernel[(n_rows, n_splits)](
                logits_ptr=logits,
                committable_ptr=committable_u8,
                stride_lb=logits.stride(0),
                stride_ll=logits.stride(1),
                stride_lv=logits.stride(2),
                **shared,
            )
        if exchange is not None:  # fused only (checked above): every shard's splits, in vocabulary order
            part_f, part_i, n_splits = _exchanged(exchange, part_f, part_i, n_rows, n_splits)
            n_part = n_rows * n_splits

        tokens = torch.empty((B, Lr), dtype=torch.int64, device=device)
        confidence = torch.empty((B, Lr), dtype=torch.float32, device=device)
        committed = torch.empty((B, Lr), dtype=torch.bool, device=device)
        use_threshold = threshold is not None
        _commit_kernel[(B, triton.cdiv(Lr, COMMIT_BLOCK))](
            x,
            committable_u8,
            committable_u8 if use_threshold else num_transfer,
            part_f,
            part_i,
            deferred,
            seed,
            tokens,
            confidence,
            committed.view(torch.uint8),
            Lr,
            V,
            start,
            n_splits,
            n_part,
            len(deferred_token_ids),
            x.stride(0),
            x.stride(1),
            float(threshold) if use_threshold else 0.0,
            SAMPLE=sample,
            RANDOM=random,
            RULE=rule,
            USE_THRESHOLD=use_threshold,
            BLOCK=COMMIT_BLOCK,
            num_warps=COMMIT_WARPS,
        )
    return UnmaskResult(x, committed, tokens, confidence)


# ----------------------------------------------------------------------------------------------
# Compile cases: every autotune config x dtype at temperature 0; the sampling variant (the Philox
# code) with each dtype's first config; each commit code path once. (The GPU-free check compiles
# every case twice, for sm_80 and sm_90: the sampling variants of every config would double it.)
# ----------------------------------------------------------------------------------------------

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTERS = {
    "committable_ptr": "*u8",
    "committed_ptr": "*u8",
    "banned_ptr": "*i32",
    "deferred_ptr": "*i32",
    "rows_ptr": "*i32",
    "n_rows_ptr": "*i32",
    "part_i_ptr": "*i32",
    "part_f_ptr": "*fp32",
    "confidence_ptr": "*fp32",
    "seed_ptr": "*i64",
    "x_ptr": "*i64",
    "tokens_ptr": "*i64",
    "num_transfer_ptr": "*i64",
}
_FLOAT_SCALARS = ("inv_temp", "threshold")


def _case(kernel, name: str, constexprs: dict, cfg, scores: str = "", hopper_features=()) -> CompileCase:
    """A CompileCase of ``kernel``: scores pointers of type ``scores``, other scalars i32."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = _POINTERS.get(arg, scores)
        else:
            signature[arg] = "fp32" if arg in _FLOAT_SCALARS else "i32"
    return CompileCase(
        kernel=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name=name,
        hopper_features=hopper_features,
    )


@compile_cases
def _unmask_compile_cases():
    for dtype, dname in _DTYPE_NAME.items():
        ptr = "*" + dname
        for sample, configs in ((False, LOGITS_CONFIGS), (True, LOGITS_CONFIGS[:1])):
            for cfg in configs:
                name = f"unmask_logits_partials[{dname}, sample={sample}, {cfg.kwargs}]"
                constexprs = {"SAMPLE": sample, "RULE": 0, **cfg.kwargs}
                yield _case(_logits_partials_kernel, name, constexprs, cfg, ptr)
        for rule in (1, 2):  # margin / entropy partials: each path's first config
            cfg = LOGITS_CONFIGS[0]
            name = f"unmask_logits_partials[{dname}, rule={rule}, {cfg.kwargs}]"
            yield _case(
                _logits_partials_kernel, name, {"SAMPLE": False, "RULE": rule, **cfg.kwargs}, cfg, ptr
            )
            cfg = lm_head_configs(dtype)[0]
            name = f"unmask_lm_head_partials[{dname}, rule={rule}, {cfg.kwargs}]"
            constexprs = {
                "SAMPLE": False,
                "RULE": rule,
                "DOT_PRECISION": "ieee" if dname == "fp32" else "tf32",
                **cfg.kwargs,
            }
            yield _case(
                _lm_head_partials_kernel, name, constexprs, cfg, ptr, () if dname == "fp32" else ("wgmma",)
            )
        tuned = lm_head_configs(dtype)
        for sample, configs in ((False, tuned), (True, tuned[:1])):
            for cfg in configs:
                name = f"unmask_lm_head_partials[{dname}, sample={sample}, {cfg.kwargs}]"
                constexprs = {
                    "SAMPLE": sample,
                    "RULE": 0,
                    "DOT_PRECISION": "ieee" if dname == "fp32" else "tf32",
                    **cfg.kwargs,
                }
                hopper = () if dname == "fp32" else ("wgmma",)
                yield _case(_lm_head_partials_kernel, name, constexprs, cfg, ptr, hopper)
    commit = triton.Config({}, num_warps=COMMIT_WARPS, num_stages=1)
    paths = ((False, False, False, 0), (False, False, True, 0), (True, True, False, 0))
    paths += ((False, False, False, 1), (False, False, True, 2))
    for sample, random, use_threshold, rule in paths:
        name = f"unmask_commit[sample={sample}, random={random}, threshold={use_threshold}, rule={rule}]"
        constexprs = {
            "SAMPLE": sample,
            "RANDOM": random,
            "RULE": rule,
            "USE_THRESHOLD": use_threshold,
            "BLOCK": COMMIT_BLOCK,
        }
        yield _case(_commit_kernel, name, constexprs, commit)
