"""bidirectional_attention (Triton) against torch SDPA, timed in the same run.

GPU (bf16, D = 128), the shapes of issue 5:
  * long: non-causal ``Lq = Lk`` in 1k..16k, batch x heads >= 128 (the planner's full forward);
  * short: ``Lq = 32`` queries over ``Lk`` = 512..8k cached keys, B = 1..64, Hq = 32, Hkv = 8/32
    (a cached denoising step; memory-bound: GB/s against the measured copy bandwidth);
  * causal prefill ``L`` = 512..8k (the executor).
The baseline is the fastest SDPA backend (flash, cuDNN, memory-efficient; GQA by ``enable_gqa`` or
by pre-repeated K/V, whichever is faster) on ``[B, H, L, D]`` tensors prepared outside the timing.
Both sides are captured in CUDA graphs and timed by replay, so the figures are GPU time, not
Python launch overhead. On the CPU: two tiny fp32 shapes through the Triton interpreter.

    pytest benches/bench_attention.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import DEVICE, ON_GPU, QUICK, compare, cuda_graphed

from hybridkernels.benchmarking import time_ms
from hybridkernels.ops import bidirectional_attention
from hybridkernels.ops._dispatch import triton_interpreting

D = 128 if ON_GPU else 64
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

if ON_GPU and QUICK:  # gpu_check.sh: the ends of each range
    LONG = [(max(4, 16384 // L), L, 32, 32) for L in (1024, 4096, 16384)]
    SHORT = [(B, 32, Lk, 32, 8) for B in (1, 64) for Lk in (512, 8192)] + [(8, 32, 2048, 32, 32)]
    CAUSAL = [(8, 2048, 32, 8)]
elif ON_GPU:
    LONG = [(max(4, 16384 // L), L, 32, 32) for L in (1024, 2048, 4096, 8192, 16384)]
    SHORT = [(B, 32, Lk, 32, hkv) for hkv in (8, 32) for B in (1, 8, 64) for Lk in (512, 2048, 8192)]
    CAUSAL = [(max(1, 16384 // L), L, 32, 8) for L in (512, 2048, 8192)]
else:  # the interpreter costs ~1 s per 4x256x64 attention: keep it to a smoke run
    LONG = [(1, 64, 2, 2)]
    SHORT = [(2, 8, 256, 4, 1)]
    CAUSAL = [(1, 48, 2, 1)]


def _setup():
    if not ON_GPU and not triton_interpreting():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 on the CPU")


def _sdpa_candidates(q, k, v, causal):
    """(name, fn) of every SDPA variant that runs these [B, L, H, D] inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Hq, Hkv = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2).contiguous()
    layouts = {"gqa": (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), Hq != Hkv)}
    if Hq != Hkv:
        rep = Hq // Hkv
        kr = k.repeat_interleave(rep, 2).transpose(1, 2).contiguous()
        layouts["repeat_kv"] = (kr, v.repeat_interleave(rep, 2).transpose(1, 2).contiguous(), False)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    if not ON_GPU:
        backends = {"math": SDPBackend.MATH}
    found = []
    for layout, (kt, vt, gqa) in layouts.items():
        for name, backend in backends.items():

            def fn(kt=kt, vt=vt, gqa=gqa, backend=backend):
                with sdpa_kernel([backend]):
                    extra = {"enable_gqa": True} if gqa else {}
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **extra)

            try:
                fn()
            except (RuntimeError, TypeError):  # backend unsupported for this shape/dtype/GPU
                continue
            found.append((f"sdpa-{name}-{layout}", fn))
    return found


def _fastest_sdpa(q, k, v, causal):
    """(name, eager fn, timed fn) of the fastest SDPA variant (the timed fn replays a CUDA graph)."""
    best, best_ms = None, float("inf")
    for name, fn in _sdpa_candidates(q, k, v, causal):
        if not ON_GPU:
            return name, fn, fn
        try:
            replay = cuda_graphed(fn, DEVICE)
        except RuntimeError:  # not capturable: not a candidate
            continue
        ms = time_ms(replay, DEVICE, reps=5)
        if ms < best_ms:
            best, best_ms = (name, fn, replay), ms
    return best


def _run(benchmark, B, Lq, Lk, Hq, Hkv, causal, regime):
    _setup()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, Lq, Hq, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(B, Lk, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(B, Lk, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)

    def ours():
        return bidirectional_attention(q, k, v, causal=causal, backend="triton")

    name, sdpa, sdpa_timed = _fastest_sdpa(q, k, v, causal)
    expected = sdpa().transpose(1, 2)
    got = ours()  # also autotunes, before any graph capture
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)

    if causal:  # query i sees i + Lk - Lq + 1 keys
        pairs = Lq * (Lk - Lq) + Lq * (Lq + 1) // 2
    else:
        pairs = Lq * Lk
    flops = 4.0 * B * Hq * pairs * D
    elt = q.element_size()
    nbytes = elt * (2 * q.numel() + k.numel() + v.numel())  # q, out, K and V once
    compare(
        benchmark,
        cuda_graphed(ours, DEVICE),
        sdpa_timed,
        flops=flops,
        nbytes=nbytes,
        baseline_name=name,
        regime=regime,
        shape=dict(B=B, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, dtype=str(DTYPE), causal=causal),
        timing="cuda-graph replay" if ON_GPU else "wall clock (interpreter)",
    )


@pytest.mark.parametrize("B, L, Hq, Hkv", LONG, ids=[f"B{b}-L{l}-H{h}" for b, l, h, _ in LONG])
def test_long_noncausal(benchmark, B, L, Hq, Hkv):
    _run(benchmark, B, L, L, Hq, Hkv, False, "long")


@pytest.mark.parametrize(
    "B, Lq, Lk, Hq, Hkv", SHORT, ids=[f"B{b}-Lq{lq}-Lk{lk}-Hkv{h}" for b, lq, lk, _, h in SHORT]
)
def test_short_over_cache(benchmark, B, Lq, Lk, Hq, Hkv):
    _run(benchmark, B, Lq, Lk, Hq, Hkv, False, "short")


@pytest.mark.parametrize("B, L, Hq, Hkv", CAUSAL, ids=[f"B{b}-L{l}-Hkv{h}" for b, l, _, h in CAUSAL])
def test_causal_prefill(benchmark, B, L, Hq, Hkv):
    _run(benchmark, B, L, L, Hq, Hkv, True, "causal")
