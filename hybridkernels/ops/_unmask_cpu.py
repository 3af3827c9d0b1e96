"""The CPU fused path of ``unmask_step``: ``_C``'s one-pass LM-head scoring, certified exact.

For ``hidden [B, Lr, d]`` + ``lm_head [V, d]`` at temperature 0 with ``low_confidence``
remasking, ``_C.unmask_scores`` streams the LM head once and returns per masked row the argmax,
the top two logits and the softmax denominator, with no ``[B, Lr, V]`` logits; from a weight's
second use on, it streams a k-major packed float32 copy instead (:func:`packed_lm_head`: a GEMM
microkernel with the vocabulary along the SIMD lanes; ``HYBRIDKERNELS_UNMASK_PACK_MB`` caps the
copies, 1024 by default). Its float32 dot products round in another order than torch's matmul,
so this module commits only when the margins *prove* the reference would commit the same rows
with the same tokens:

* a logit of any float32 matmul lies within ``d 2^-24 ||h|| max_v ||w_v||`` of the exact
  product, ours within ``n 2^-24 ||h|| max_v ||w_v||`` (:func:`rounding_terms`: ``n = c +
  ceil(d / c) - 1`` on the packed LM head, ``c = ceil(sqrt(d))``, 31 at ``d = 256``; ``d / 16 +
  26`` row-major), so the argmax is the reference's when the top-1 / top-2 gap exceeds twice the
  sum of both;
* the confidence ``1 / sum_exp`` then differs from the reference's ``softmax`` by at most
  ``tol`` (relative): the logit errors, our exp, and torch's float32 sum of ``V`` exponentials
  (bounded by ``V / 8`` roundings);
* ``num_transfer``: the confidences on either side of each row's cut differ by more than
  ``2 tol``; ``threshold``: no confidence lies within ``tol`` of the threshold, and the top two
  (Fast-dLLM's "at least one") are apart.

Otherwise (ties, near-ties, non-finite scores, anything uncertain) :func:`fused_cpu_unmask_step`
returns None and the caller runs the reference, so every commit is the reference's. The
returned confidences are ours, within ``tol`` of the reference's.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import _cuda
from ..common import UnmaskResult

_U = 2.0**-24  # float32 unit roundoff
# Splitting the vocabulary over threads pays off from this many multiply-adds per row.
_MIN_SPLIT_WORK = 1 << 22

# id(lm_head) -> (weak reference, in-place version, norm); tensors compare elementwise, so no
# WeakKeyDictionary.
_NORMS: dict[int, tuple[weakref.ref, int, float]] = {}
# id(lm_head) -> (weak reference, in-place version, packed copy or None while seen once).
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}
# The packed copies (float32, one per LM head) may hold this many bytes in all; LM heads beyond
# it are scored row-major. HYBRIDKERNELS_UNMASK_PACK_MB overrides it (0: never pack).
_PACK_LIMIT_BYTES = int(float(os.environ.get("HYBRIDKERNELS_UNMASK_PACK_MB", "1024")) * 2**20)
_POOL: ThreadPoolExecutor | None = None


def unsupported_reason(hidden, lm_head, logits, temperature: float, remasking: str, device) -> str | None:
    """Why the fused CPU path cannot take these inputs, or None when it can."""
    if device.type != "cpu":
        return "the compiled unmask_step is CPU-only (GPUs run the Triton kernel)"
    if logits is not None or hidden is None:
        return "the compiled unmask_step takes hidden + lm_head (the fused path), not logits"
    if temperature != 0:
        return "the compiled unmask_step is argmax-only (temperature 0)"
    if remasking != "low_confidence":
        return f"the compiled unmask_step ranks by low_confidence only, not {remasking!r}"
    if torch.compiler.is_compiling():
        return "the compiled unmask_step is not traceable (torch.compile)"
    return _cuda.unavailable_reason(device)


def lm_head_max_norm(lm_head: torch.Tensor) -> float:
    """``max_v ||lm_head[v]||_2`` (float64), cached per tensor and in-place version (not for
    inference tensors, which have no version counter)."""
    if lm_head.is_inference():
        return float(torch.linalg.vector_norm(lm_head, dim=1, dtype=torch.float64).max())
    hit = _NORMS.get(id(lm_head))  # dict operations are atomic: no lock (a race recomputes)
    if hit is not None and hit[0]() is lm_head and hit[1] == lm_head._version:
        return hit[2]
    norm = float(torch.linalg.vector_norm(lm_head.double(), dim=1).max())
    key = id(lm_head)

    def forget(ref, key=key):
        if _NORMS.get(key, (None,))[0] is ref:
            _NORMS.pop(key, None)

    _NORMS[key] = (weakref.ref(lm_head, forget), lm_head._version, norm)
    return norm


def k_chunk(d: int) -> int:
    """The chunk length of the packed path's product sums: ``ceil(sqrt(d))``, which minimises
    the rounding count of :func:`rounding_terms`."""
    return math.isqrt(d - 1) + 1 if d > 1 else 1


def rounding_terms(d: int, packed: bool) -> int:
    """``n`` such that each of ``_C.unmask_scores``'s float32 logits lies within ``n 2^-24
    sum_k |h_k w_k|`` (to first order; callers scale by 1.01 for ``gamma_n``) of the exact one.

    Packed: each chunk of ``c = k_chunk(d)`` products is summed in registers (its first product
    rounded once, then one rounding per FMA, or per multiply and add: at most ``c`` roundings
    reach any product), and the ``ceil(d / c)`` chunk sums are added in ``k`` order (at most
    ``ceil(d / c) - 1`` more). Row-major: 16 lanes of ``d / 16`` FMAs, a 4-level lane tree and
    the ``d % 16`` tail, ``d // 16 + 26`` with the old margin."""
    if packed:
        c = k_chunk(d)
        return c + -(-d // c) - 1
    return d // 16 + 26


def packed_lm_head(lm_head: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of ``lm_head [V, d]`` that ``_C.unmask_scores`` scores fastest: float32
    ``[ceil(V / P), d, P]``, ``packed[p, k, c] = lm_head[p * P + c, k]`` (zero past ``V``), ``P =
    _C.unmask_panel``; or None (score ``lm_head`` row-major).

    Cached per tensor and in-place version, made the second time the same version is seen (a
    tensor made anew for every call never pays for a copy) and while all copies together stay
    within ``_PACK_LIMIT_BYTES``. An in-place update of ``lm_head`` makes a new copy. None for
    inference tensors (made under ``torch.inference_mode``: they have no version counter) and on
    CPUs without AVX2 (``_C.unmask_panel == 0``), where the row-major path is faster."""
    if lm_head.is_inference() or not _cuda._C.unmask_panel:  # 0: no faster packed path here
        return None
    key = id(lm_head)
    hit = _PACKED.get(key)
    fresh = hit is not None and hit[0]() is lm_head and hit[1] == lm_head._version
    if fresh and hit[2] is not None:
        return hit[2]
    packed = None
    if fresh:  # the second sighting of this version: pack it if it fits
        V, d = lm_head.shape
        panel = _cuda._C.unmask_panel
        panels = -(-V // panel)
        held = sum(t.nbytes for _, _, t in list(_PACKED.values()) if t is not None)
        if held + panels * panel * d * 4 <= _PACK_LIMIT_BYTES:
            with torch.no_grad():
                padded = torch.zeros(panels * panel, d, dtype=torch.float32)
                padded[:V] = lm_head
                packed = padded.view(panels, panel, d).transpose(1, 2).contiguous()

    def forget(ref, key=key):
        if _PACKED.get(key, (None,))[0] is ref:
            _PACKED.pop(key, None)

    _PACKED[key] = (weakref.ref(lm_head, forget), lm_head._version, packed)
    return packed


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's worker threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="hk-unmask")
    return _POOL


def scores(hidden: torch.Tensor, lm_head: torch.Tensor, banned: Sequence[int]):
    """``_cuda.unmask_scores`` over ``torch.get_num_threads()`` vocabulary ranges in parallel
    (``_C`` releases the GIL), merged, on :func:`packed_lm_head`'s copy when there is one.
    Returns ``(argmax, top, second, sum_exp, finite, terms)``; rows with ``finite`` False (a NaN
    or infinite maximum) have no meaningful partials; from one range ``finite`` is None: a row is
    finite when its ``top`` and ``sum_exp`` are. ``terms``: the logits' :func:`rounding_terms`."""
    V, d = lm_head.shape
    R = hidden.shape[0]
    packed = packed_lm_head(lm_head)
    terms = rounding_terms(d, packed is not None)
    chunk = k_chunk(d) if packed is not None else 0
    # Ranges of whole panels on the packed copy.
    unit = 1 if packed is None else packed.shape[2]
    units = -(-V // unit)
    parts = max(1, min(torch.get_num_threads(), (R * V * d) // _MIN_SPLIT_WORK, units))
    if parts == 1:
        return (*_cuda.unmask_scores(hidden, lm_head, banned, packed, chunk), None, terms)
    bounds = [min(V, units * i // parts * unit) for i in range(parts + 1)]
    ids = sorted(set(banned))
    # Workers run only _C (no torch op: a forked child's intra-op pool rejects other threads).
    local = [[t - bounds[i] for t in ids if bounds[i] <= t < bounds[i + 1]] for i in range(parts)]
    heads = [lm_head[bounds[i] : bounds[i + 1]] for i in range(parts)]
    packs = [
        None if packed is None else packed[bounds[i] // unit : -(-bounds[i + 1] // unit)]
        for i in range(parts)
    ]
    res = list(
        _pool().map(lambda i: _cuda.unmask_scores(hidden, heads[i], local[i], packs[i], chunk), range(parts))
    )
    offsets = torch.tensor(bounds[:-1], dtype=torch.int64)[:, None]
    am, top, second, s = (torch.stack(t) for t in zip(*res, strict=True))  # [parts, R]
    # A range whose every logit is -inf (banned) contributes nothing; NaN / +inf rows fall back.
    empty = top == float("-inf")
    finite = (torch.isfinite(top) | empty).all(0) & (torch.isfinite(s) | empty).all(0) & ~empty.all(0)
    best = top.argmax(0)  # ties between ranges make the top-2 gap 0: uncertain either way
    m = top.gather(0, best[None])[0]
    others = top.scatter(0, best[None], float("-inf")).amax(0)
    sec = torch.maximum(second.gather(0, best[None])[0], others)
    weights = torch.where(empty, 0.0, torch.exp(top.double() - m.double()) * s)
    return (am + offsets).gather(0, best[None])[0], m, sec, weights.sum(0), finite, terms


def fused_cpu_unmask_step(
    x: torch.Tensor,
    *,
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    mask_id: int,
    start: int,
    num_transfer: torch.Tensor | None,
    threshold: float | None,
    banned_token_ids: Sequence[int],
    deferred_token_ids: Sequence[int],
) -> UnmaskResult | None:
    """``unmask_step`` (temperature 0, ``low_confidence``) from ``hidden [B, Lr, d]`` and
    ``lm_head [V, d]`` on the CPU, or None (``x`` untouched) when the margins cannot prove the
    commit is the reference's (see the module docstring). Arguments as validated by
    ``check_unmask_args``."""
    B, Lr, d = hidden.shape
    V = lm_head.shape[0]
    window = x[:, start : start + Lr]
    rows = (window == mask_id).view(-1).nonzero()[:, 0]
    tokens = window.clone()
    if not rows.numel():
        confidence = torch.full((B, Lr), float("-inf"), dtype=torch.float32)
        return UnmaskResult(x, torch.zeros(B, Lr, dtype=torch.bool), tokens, confidence)
    h = hidden.reshape(B * Lr, d).index_select(0, rows)  # [rows, d]
    am, top, second, s, finite, terms = scores(h, lm_head, banned_token_ids)
    # The margins are checked in Python floats (IEEE doubles, as float64 tensors would be): a few
    # dozen values, where each torch op would cost more than the arithmetic.
    top, second = top.tolist(), second.tolist()
    if not (all(finite.tolist()) if finite is not None else all(map(math.isfinite, top + s.tolist()))):
        return None
    # |matmul - exact| <= gamma_d sum|h w| in any summation order, ours <= gamma_terms sum|h w|
    # (rounding_terms); gamma_n <= 1.01 n u here; sum|h w| <= ||h|| max_v ||w_v||.
    scale = 1.01 * (d + terms) * _U
    w_norm = lm_head_max_norm(lm_head)
    err = [scale * n * w_norm for n in torch.linalg.vector_norm(h, dim=1, dtype=torch.float64).tolist()]
    if not all(t - u > 2 * e for t, u, e in zip(top, second, err, strict=True)):
        return None
    # Relative: logit errors (2 err), our exp (4e-7) and torch's float32 softmax sum.
    tol = 2.02 * max(err) + 4e-7 + (V / 8 + 64) * _U
    ids, flat = am.tolist(), rows.tolist()
    conf = s.reciprocal_().float().tolist()  # float32 values
    if deferred_token_ids:
        deferred = set(deferred_token_ids)
        conf = [float("-inf") if t in deferred else c for t, c in zip(ids, conf, strict=True)]
    k = None if num_transfer is None else num_transfer.tolist()
    chosen = _certain_commits(flat, conf, B, Lr, k, threshold, tol)
    if chosen is None:
        return None
    # The outputs from Python lists: one tensor each instead of fill + scatter.
    full = [float("-inf")] * (B * Lr)
    for i, c in zip(flat, conf, strict=True):
        full[i] = c
    flags = [False] * (B * Lr)
    for j in chosen:
        flags[flat[j]] = True
    confidence = torch.tensor(full, dtype=torch.float32).view(B, Lr)
    committed = torch.tensor(flags).view(B, Lr)
    tokens.view(-1).index_copy_(0, rows, am)
    window.copy_(torch.where(committed, tokens, window))
    return UnmaskResult(x, committed, tokens, confidence)


def _apart(a: float, b: float, tol: float) -> bool:
    """``a >= b`` ranked apart for certain: equal ``-inf`` (ordered by position in both) or
    ``a - b > 2 tol |a|``."""
    return (a == b == float("-inf")) or a - b > 2 * tol * abs(a)


def _certain_commits(rows, conf, B: int, Lr: int, num_transfer, threshold, tol: float):
    """The rows that ``rank_and_commit`` commits ranked by our confidences ``conf`` (of the
    committable flat indices ``rows``, each within ``tol`` of the reference's, relative), as
    positions in ``rows``, when ranking by the reference's provably commits the same; else
    None. ``num_transfer``: a list of ``B`` ints, or None with ``threshold``."""
    ranked = [[] for _ in range(B)]  # per sequence: (confidence, position in rows), ranked
    for j, (i, c) in enumerate(zip(rows, conf, strict=True)):
        ranked[i // Lr].append((c, j))
    for r in ranked:
        r.sort(key=lambda e: -e[0])  # stable: ties keep the lower index first
    if threshold is not None:
        if any(c > float("-inf") and abs(c - threshold) <= tol * abs(c) for c in conf):
            return None
        if not all(_apart(r[0][0], r[1][0], tol) for r in ranked if len(r) >= 2):
            return None
        # Fast-dLLM's rule: every row at or above the threshold, and the first in rank.
        return [j for r in ranked for n, (c, j) in enumerate(r) if n == 0 or c >= threshold]
    # The first k of a sequence commit: the k-th and (k+1)-th must be apart, where k cuts it.
    if not all(
        _apart(r[k - 1][0], r[k][0], tol) for r, k in zip(ranked, num_transfer, strict=True) if 0 < k < len(r)
    ):
        return None
    return [j for r, k in zip(ranked, num_transfer, strict=True) for _, j in r[: max(k, 0)]]
