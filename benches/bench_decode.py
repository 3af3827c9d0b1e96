"""decode_attention (the ``_C`` split-KV kernel) against torch SDPA on the same cache, same run.

GPU (bf16, D = 128, Hkv = 8, Hq = 32, the shapes of issue 8): B in 1..64, every row holding L in
1k..32k keys. The baseline is the fastest SDPA backend that takes the cache as it is stored
(``k_cache.transpose(1, 2)`` views, ``enable_gqa``), all rows full so it needs no mask; the
reference op is timed too where it fits in memory. Both sides are captured in CUDA graphs and
timed by replay (GPU time); ``ours_eager_ms`` adds the Python / argument-check overhead of one
un-captured call. Bytes = K and V read once, reported as GB/s and as a fraction of the measured
copy bandwidth. ``test_shared_prefix`` times the cascade (one prefix for every row) against the
same attention with the prefix copied into every row's cache. On the CPU: tiny fp32 shapes
through the C++ path.

    pytest benches/bench_decode.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import DEVICE, ON_GPU, compare, cuda_graphed

from hybridkernels import _cuda, reference
from hybridkernels.benchmarking import time_ms
from hybridkernels.ops import decode_attention

D = 128 if ON_GPU else 64
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HQ, HKV = (32, 8) if ON_GPU else (8, 2)
TOL = dict(atol=2e-2, rtol=2e-2) if ON_GPU else dict(atol=1e-4, rtol=1e-4)

if ON_GPU:
    SHAPES = [(B, L) for B in (1, 8, 64) for L in (1024, 4096, 32768)] + [(16, 8192), (32, 16384)]
    PREFIX = [(16, 4096, 256), (64, 2048, 128)]  # (B, prefix, own keys per row)
    REFERENCE_MAX_ELEMS = 1 << 28  # the reference repeats K/V in fp32: skip it above this
else:
    SHAPES = [(2, 256)]
    PREFIX = [(3, 64, 16)]
    REFERENCE_MAX_ELEMS = 1 << 24


def _setup():
    if not _cuda.available() or (ON_GPU and not _cuda.has_cuda()):
        pytest.skip("hybridkernels._C is not built for this device")


def _fastest_sdpa(q, k_cache, v_cache):
    """(name, eager fn, timed fn) of the fastest SDPA backend on the cache's own layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    best, best_ms = None, float("inf")
    # The math backend materialises the GQA-expanded cache: only when nothing else runs.
    for name, backend in [*backends.items(), ("math", SDPBackend.MATH)]:
        if name == "math" and best is not None:
            break

        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)[:, :, 0]

        try:
            fn()
            timed = cuda_graphed(fn, DEVICE)
        except (RuntimeError, TypeError):  # backend unsupported for this shape / layout / GPU
            continue
        if not ON_GPU:
            return f"sdpa-{name}", fn, timed
        ms = time_ms(timed, DEVICE, reps=5)
        if ms < best_ms:
            best, best_ms = (f"sdpa-{name}", fn, timed), ms
    return best


def _cache(B, L, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, HQ, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(B, L, HKV, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(B, L, HKV, D, device=DEVICE, dtype=DTYPE, generator=g)
    return q, k, v


@pytest.mark.parametrize("B, L", SHAPES, ids=[f"B{b}-L{l}" for b, l in SHAPES])
def test_decode(benchmark, B, L):
    _setup()
    q, k_cache, v_cache = _cache(B, L)
    cache_lens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)

    def ours():
        return decode_attention(q, k_cache, v_cache, cache_lens, backend="cuda")

    name, sdpa, sdpa_timed = _fastest_sdpa(q, k_cache, v_cache)
    got = ours()
    torch.testing.assert_close(got, sdpa(), **TOL)
    extra = {}
    if B * L * HQ * D <= REFERENCE_MAX_ELEMS:
        ref = lambda: reference.decode_attention(q, k_cache, v_cache, cache_lens)  # noqa: E731
        torch.testing.assert_close(got, ref(), **TOL)
        if not benchmark.disabled:
            extra["reference_ms"] = time_ms(ref, DEVICE, reps=3)
    if not benchmark.disabled:
        extra["ours_eager_ms"] = time_ms(ours, DEVICE, reps=10)
        extra["num_splits"] = _cuda._C.decode_plan(
            [B, HQ, D], [B, L, HKV, D], 0, _cuda.DTYPE_CODES[DTYPE], 0, _cuda._device_and_stream(q)[0]
        )[0]
    compare(
        benchmark,
        cuda_graphed(ours, DEVICE),
        sdpa_timed,
        flops=4.0 * B * HQ * L * D,
        nbytes=2.0 * k_cache.numel() * k_cache.element_size(),  # K and V read once
        baseline_name=name,
        shape=dict(B=B, L=L, Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE)),
        timing="cuda-graph replay" if ON_GPU else "wall clock",
        **extra,
    )


@pytest.mark.parametrize("B, P, L", PREFIX, ids=[f"B{b}-P{p}-L{l}" for b, p, l in PREFIX])
def test_shared_prefix(benchmark, B, P, L):
    """Cascade: one [P, Hkv, D] prefix for all rows vs the prefix copied into every row."""
    _setup()
    q, k_own, v_own = _cache(B, L, seed=1)
    _, k_pre, v_pre = _cache(1, P, seed=2)
    prefix = (k_pre[0], v_pre[0], P)
    cache_lens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    k_flat = torch.cat([k_pre.expand(B, -1, -1, -1), k_own], dim=1)
    v_flat = torch.cat([v_pre.expand(B, -1, -1, -1), v_own], dim=1)
    flat_lens = cache_lens + P

    def ours():
        return decode_attention(q, k_own, v_own, cache_lens, prefix=prefix, backend="cuda")

    def copied():
        return decode_attention(q, k_flat, v_flat, flat_lens, backend="cuda")

    torch.testing.assert_close(ours(), copied(), **TOL)
    elt = k_own.element_size()
    compare(
        benchmark,
        cuda_graphed(ours, DEVICE),
        cuda_graphed(copied, DEVICE),
        flops=4.0 * B * HQ * (P + L) * D,
        nbytes=2.0 * elt * (k_own.numel() + k_pre.numel()),  # unique K/V bytes, prefix once
        baseline_name="decode with the prefix copied into every row",
        shape=dict(B=B, P=P, L=L, Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE)),
        timing="cuda-graph replay" if ON_GPU else "wall clock",
    )
