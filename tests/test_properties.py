"""Property-based tests (hypothesis): each of the four ops against the reference on randomly
drawn shapes, strides, dtypes, masks and lengths.

The ``ci`` profile (the default) is derandomized, so a run is reproducible and CI time is fixed;
``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`` draws many more, random cases.
Triton kernels run in the interpreter on the CPU (fp16/fp32 only there: the interpreter's bf16
``tl.dot`` is wrong); the ``_C`` ops run their C++ path, every dtype.
"""

import os

import pytest
import torch

from hybridkernels import _cuda, reference
from hybridkernels.ops import attention, decode_attention, kv_append, unmask_step
from hybridkernels.ops._dispatch import triton_interpreting

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON = HAS_CUDA or triton_interpreting()
requires_triton = pytest.mark.skipif(not TRITON, reason="triton on CPU needs TRITON_INTERPRET=1")
requires_c = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")

KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def randn(g: torch.Generator, *shape, dtype, strided: bool) -> torch.Tensor:
    """A random tensor of ``shape`` on DEVICE; ``strided``: a view with every stride but the last
    one's padded (a slice of a larger buffer, as q/k/v split from a fused projection are)."""
    if not strided:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)
    wide = torch.randn(*shape[:-2], shape[-2] * 2 + 1, shape[-1], generator=g).to(DEVICE, dtype)
    return wide[..., 1::2, :]


def same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with ``t``'s strides (``clone`` of a view with gaps is contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def left_padding_mask(g, B, L, *, allow_empty: bool) -> torch.Tensor:
    """bool ``[B, L]``, True = real token, zeros first; each row keeps at least one token unless
    ``allow_empty``."""
    low = 0 if allow_empty else 1
    keep = torch.randint(low, L + 1, (B,), generator=g)
    return (torch.arange(L) >= L - keep[:, None]).to(DEVICE)


@requires_triton
@given(data=st.data())
def test_attention_triton_equals_reference(data):
    draw = data.draw
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([32, 64]))
    Lk = draw(st.integers(1, 40))
    Lq = draw(st.integers(1, Lk))
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    causal, padded, strided, lse = (draw(st.booleans()) for _ in range(4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = randn(g, B, Lq, Hkv * group, D, dtype=dtype, strided=strided)
    k = randn(g, B, Lk, Hkv, D, dtype=dtype, strided=strided)
    v = randn(g, B, Lk, Hkv, D, dtype=dtype, strided=strided)
    mask = left_padding_mask(g, B, Lk, allow_empty=True) if padded else None
    kw = dict(key_padding_mask=mask, causal=causal, return_lse=lse)
    out = attention(q, k, v, backend="triton", **kw)
    ref = reference.bidirectional_attention(q, k, v, **kw)
    if lse:
        (out, out_lse), (ref, ref_lse) = out, ref
        assert torch.equal(torch.isinf(out_lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(out_lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@requires_triton
@given(data=st.data())
def test_unmask_triton_equals_reference(data):
    draw = data.draw
    B, Lr, V = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(4, 300))
    start = draw(st.integers(0, 3))
    L = start + Lr + draw(st.integers(0, 3))
    fused = draw(st.booleans())
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask_id = draw(st.integers(0, V - 1))
    x = torch.randint(0, V, (B, L), generator=g)
    x[x == mask_id] = (mask_id + 1) % V
    window = x[:, start : start + Lr]
    window[torch.rand(B, Lr, generator=g) < draw(st.floats(0.0, 1.0))] = mask_id
    x = x.to(DEVICE)
    masked = (x[:, start : start + Lr] == mask_id).sum(1).cpu()
    if draw(st.booleans()):
        rule = {"threshold": draw(st.floats(0.0, 1.0))}
    else:
        num = torch.stack([torch.randint(0, int(m) + 1, (), generator=g) for m in masked])
        if draw(st.booleans()):  # a strided view, as a row of a per-step table is
            num = torch.stack([num, torch.full_like(num, 99)], 1).reshape(-1)[::2]
        rule = {"num_transfer": num.to(DEVICE)}
    special = st.lists(st.integers(0, V - 1), max_size=3, unique=True)
    kw = dict(mask_id=mask_id, start=start, banned_token_ids=draw(special), deferred_token_ids=draw(special))
    if fused:
        d = draw(st.sampled_from([8, 16, 32]))
        kw |= dict(
            hidden=randn(g, B, Lr, d, dtype=dtype, strided=False),
            lm_head=randn(g, V, d, dtype=dtype, strided=False),
        )
    else:
        logits = randn(g, B, Lr + 2, V, dtype=dtype, strided=draw(st.booleans()))
        kw["logits"] = logits[:, 1 : Lr + 1]
    ref = reference.unmask_step(x.clone(), **rule, **kw)
    out = unmask_step(x.clone(), backend="triton", **rule, **kw)
    assert torch.equal(out.x, ref.x)
    assert torch.equal(out.committed, ref.committed)
    assert torch.equal(out.tokens, ref.tokens)
    finite = torch.isfinite(ref.confidence)
    assert torch.equal(torch.isfinite(out.confidence), finite)
    torch.testing.assert_close(out.confidence[finite], ref.confidence[finite], atol=1e-6, rtol=1e-5)


@requires_c
@given(data=st.data())
def test_decode_attention_c_equals_reference(data):
    draw = data.draw
    B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([64, 128]))
    Lmax = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    strided, use_prefix, lse = (draw(st.booleans()) for _ in range(3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = randn(g, B, Hkv * group, D, dtype=dtype, strided=strided)
    kc = randn(g, B, Lmax, Hkv, D, dtype=dtype, strided=strided)
    vc = randn(g, B, Lmax, Hkv, D, dtype=dtype, strided=strided)
    prefix = None
    if use_prefix:
        Lp = draw(st.integers(1, 20))
        used = draw(st.integers(1, Lp))
        prefix = (
            randn(g, Lp, Hkv, D, dtype=dtype, strided=False),
            randn(g, Lp, Hkv, D, dtype=dtype, strided=False),
            used,
        )
    low = 0 if prefix is not None else 1
    lens = torch.randint(low, Lmax + 1, (B,), generator=g).to(DEVICE, torch.int32)
    kw = dict(prefix=prefix, return_lse=lse)
    out = decode_attention(q, kc, vc, lens, backend="cuda", **kw)
    ref = reference.decode_attention(q, kc, vc, lens, **kw)
    if lse:
        (out, out_lse), (ref, ref_lse) = out, ref
        torch.testing.assert_close(out_lse, ref_lse, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@requires_c
@given(data=st.data())
def test_kv_append_c_equals_reference(data):
    draw = data.draw
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([2, 8, 64, 128]))
    Lmax = draw(st.integers(1, 40))
    T = draw(st.integers(1, Lmax))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    strided = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    caches = [randn(g, B, Lmax, H, D, dtype=dtype, strided=strided) for _ in range(2)]
    k_new, v_new = (randn(g, B, T, H, D, dtype=dtype, strided=strided) for _ in range(2))
    positions = torch.randint(0, Lmax - T + 1, (B,), generator=g)
    positions = positions.to(DEVICE, draw(st.sampled_from([torch.int32, torch.int64])))
    kw = {}
    if draw(st.booleans()):
        P = Lmax + draw(st.integers(0, 5))
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        angles = torch.arange(P).float()[:, None] * inv
        kw["rope"] = (angles.cos().to(DEVICE), angles.sin().to(DEVICE))
        if draw(st.booleans()):
            kw["rope_positions"] = torch.randint(0, P - T + 1, (B,), generator=g).to(DEVICE)
    ours = [same_layout_copy(c) for c in caches]
    refs = [c.clone() for c in caches]
    kv_append(*ours, k_new, v_new, positions, backend="cuda", **kw)
    reference.kv_append(*refs, k_new, v_new, positions, **kw)
    assert torch.equal(ours[1], refs[1]), "values are copied unchanged"
    torch.testing.assert_close(ours[0].float(), refs[0].float(), atol=0, rtol=0)
