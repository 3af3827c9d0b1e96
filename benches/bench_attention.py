"""bidirectional_attention (Triton) against torch SDPA, timed in the same run.

GPU (bf16, D = 128), the shapes of issue 5:
  * long: non-causal ``Lq = Lk`` in 1k..16k, batch x heads >= 128 (the planner's full forward);
  * short: ``Lq = 32`` queries over ``Lk`` = 512..8k cached keys, B = 1..64, Hq = 32, Hkv = 8/32
    (a cached denoising step; memory-bound: GB/s against the measured copy bandwidth);
  * causal prefill ``L`` = 512..8k (the executor);
  * block-causal ``block_causal=b`` (SDAR b = 4, Fast-dLLM v2 b = 32) over ``L`` = 2k..16k: the
    block-diffusion prefill / naive forward; baseline SDPA with the dense ``[L, L]`` block mask
    the peers build (flash takes no mask: memory-efficient, cuDNN or math).
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
    BLOCK_CAUSAL = [(4, 4096, 32, 8, 32)]
elif ON_GPU:
    LONG = [(max(4, 16384 // L), L, 32, 32) for L in (1024, 2048, 4096, 8192, 16384)]
    SHORT = [(B, 32, Lk, 32, hkv) for hkv in (8, 32) for B in (1, 8, 64) for Lk in (512, 2048, 8192)]
    CAUSAL = [(max(1, 16384 // L), L, 32, 8) for L in (512, 2048, 8192)]
    BLOCK_CAUSAL = [(max(1, 16384 // L), L, 32, 8, b) for L in (2048, 16384) for b in (4, 32)]
else:  # the interpreter costs ~1 s per 4x256x64 attention: keep it to a smoke run
    LONG = [(1, 64, 2, 2)]
    SHORT = [(2, 8, 256, 4, 1)]
    CAUSAL = [(1, 48, 2, 1)]
    BLOCK_CAUSAL = [(1, 80, 2, 1, 16)]


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


def _block_mask(L: int, b: int) -> torch.Tensor:
    """The dense mask SDAR / Fast-dLLM v2 hand to SDPA: query block >= key block."""
    blocks = torch.arange(L, device=DEVICE) // b
    return blocks[:, None] >= blocks[None, :]


def _fastest_masked_sdpa(q, k, v, mask):
    """(name, eager fn, timed fn) of the fastest SDPA backend that takes an explicit mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    kr, vr = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    if not ON_GPU:
        backends = {"math": SDPBackend.MATH}
    best, best_ms = None, float("inf")
    for name, backend in backends.items():

        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kr, vr, attn_mask=mask)

        try:
            fn()
            timed = cuda_graphed(fn, DEVICE) if ON_GPU else fn
        except RuntimeError:  # backend unsupported for this shape/dtype/GPU
            continue
        if not ON_GPU:
            return f"sdpa-{name}-mask", fn, fn
        ms = time_ms(timed, DEVICE, reps=5)
        if ms < best_ms:
            best, best_ms = (f"sdpa-{name}-mask", fn, timed), ms
    return best


@pytest.mark.parametrize(
    "B, L, Hq, Hkv, block", BLOCK_CAUSAL, ids=[f"B{b}-L{l}-Hkv{h}-b{bl}" for b, l, _, h, bl in BLOCK_CAUSAL]
)
def test_block_causal(benchmark, B, L, Hq, Hkv, block):
    _setup()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, L, Hq, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)

    def ours():
        return bidirectional_attention(q, k, v, block_causal=block, backend="triton")

    name, sdpa, sdpa_timed = _fastest_masked_sdpa(q, k, v, _block_mask(L, block))
    got = ours()  # also autotunes, before any graph capture
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, sdpa().transpose(1, 2), atol=tol, rtol=tol)
    full = L // block
    pairs = block * block * full * (full + 1) // 2 + (L % block) * L  # visible (query, key) pairs
    compare(
        benchmark,
        cuda_graphed(ours, DEVICE),
        sdpa_timed,
        flops=4.0 * B * Hq * pairs * D,
        nbytes=q.element_size() * (2 * q.numel() + k.numel() + v.numel()),
        baseline_name=name,
        regime="block_causal",
        shape=dict(B=B, Lq=L, Lk=L, Hq=Hq, Hkv=Hkv, D=D, dtype=str(DTYPE), block_causal=block),
        timing="cuda-graph replay" if ON_GPU else "wall clock (interpreter)",
    )
