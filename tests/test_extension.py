"""The compiled ``_C`` module: it checks what it is given and raises instead of crashing."""

import pytest
import torch

from hybridkernels import _cuda

pytestmark = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")


def _args(**override):
    kc, vc = torch.zeros(2, 8, 2, 4), torch.zeros(2, 8, 2, 4)
    kn, vn = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    pos = torch.tensor([0, 5], dtype=torch.int32)
    args = dict(
        k_cache=kc.data_ptr(),
        v_cache=vc.data_ptr(),
        k_new=kn.data_ptr(),
        v_new=vn.data_ptr(),
        positions=pos.data_ptr(),
        cache_shape=list(kc.shape),
        T=3,
        k_cache_strides=list(kc.stride()),
        v_cache_strides=list(vc.stride()),
        k_new_strides=list(kn.stride()),
        v_new_strides=list(vn.stride()),
        dtype=0,
        positions_dtype=3,
        device=-1,
        stream=0,
    )
    args.update(override)
    return args, (kc, vc, kn, vn, pos)


def test_build_info_describes_the_build():
    info = _cuda.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_runtime_version", "cxx"}
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_runtime_version"] > 0


def test_raw_kv_append_writes_rows():
    args, (kc, vc, kn, vn, pos) = _args()
    _cuda._C.kv_append(**args)
    assert torch.equal(kc[0, :3], kn[0]) and torch.equal(vc[1, 5:8], vn[1])
    assert kc[0, 3:].abs().sum() == 0 and kc[1, :5].abs().sum() == 0


@pytest.mark.parametrize(
    "override, exc, words",
    [
        ({"k_cache": 0}, ValueError, "k_cache: null data pointer"),
        ({"positions": 0}, ValueError, "positions: null data pointer"),
        ({"k_new_strides": [1, 2, 3]}, ValueError, "expected 4 strides"),
        ({"v_cache_strides": [64, 8, 4, -1]}, ValueError, "negative stride"),
        ({"dtype": 7}, ValueError, "dtype: expected a float code"),
        ({"positions_dtype": 0}, ValueError, "positions_dtype"),
        ({"T": 0}, ValueError, "T: expected >= 1"),
        ({"T": 9}, ValueError, "exceed the cache length"),
        ({"cache_shape": [2, 8, 2]}, ValueError, "cache_shape"),
        ({"device": -2}, ValueError, "device"),
    ],
)
def test_raw_kv_append_rejects_bad_arguments(override, exc, words):
    args, (kc, *_) = _args(**override)
    with pytest.raises(exc, match=words):
        _cuda._C.kv_append(**args)
    assert kc.abs().sum() == 0


def test_raw_kv_append_checks_positions_before_writing():
    args, (kc, vc, kn, vn, pos) = _args()
    pos[1] = 6  # 6 + 3 > 8
    with pytest.raises(IndexError, match=r"positions\[1\] = 6"):
        _cuda._C.kv_append(**args)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


def test_raw_kv_append_on_a_device_without_cuda_raises():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, _ = _args(device=0)
    with pytest.raises((ValueError, RuntimeError)):
        _cuda._C.kv_append(**args)


def test_raw_kv_append_handles_strided_views():
    buf = torch.zeros(2, 8, 2, 2, 4)  # k and v interleaved in one buffer
    kc, vc = buf[:, :, 0], buf[:, :, 1]
    kn = torch.randn(2, 4, 2, 8)[..., ::2]  # non-contiguous last dim
    vn = torch.randn(2, 1, 2, 4)
    pos = torch.tensor([4, 7])
    _cuda.kv_append(kc, vc, kn[:, :1], vn, pos)
    assert torch.equal(kc[0, 4], kn[0, 0]) and torch.equal(vc[1, 7], vn[1, 0])
    assert buf.count_nonzero() == 2 * (2 * 4) * 2


def test_custom_op_registration():
    kc, vc = torch.zeros(2, 8, 2, 4), torch.zeros(2, 8, 2, 4)
    kn, vn = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    pos = torch.tensor([0, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.hybridkernels.kv_append.default, (kc, vc, kn, vn, pos))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 6])  # 6: rows too short for 16-byte vectors
def test_cuda_kv_append_matches_cpu(dtype, D):
    g = torch.Generator().manual_seed(D)
    B, Lmax, H, T = 3, 33, 4, 5
    kc = torch.randn(B, Lmax, H, D, generator=g).to(dtype)
    vc = torch.randn(B, Lmax, H, D, generator=g).to(dtype)
    kn = torch.randn(B, T, H, D, generator=g).to(dtype)
    vn = torch.randn(B, T, H, 2 * D, generator=g).to(dtype)[..., ::2]  # strided last dim
    pos = torch.tensor([0, 28, 11], dtype=torch.int32)
    cpu = (kc.clone(), vc.clone())
    gpu = (kc.cuda(), vc.cuda())
    _cuda.kv_append(*cpu, kn, vn, pos)
    _cuda.kv_append(*gpu, kn.cuda(), vn.cuda(), pos.cuda())
    torch.cuda.synchronize()
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


# ---------------------------------------------------------------- guard bands (issue 16)
# Every _C function that writes gets tensors that are slices of a larger buffer; whatever the
# arguments, the guard elements around the slice stay untouched.

GUARD = 256
INT64_MAX = 2**63 - 1


def _guarded(*shape, dtype=torch.float32, fill=0.0):
    """(buffer, view): a view of ``shape`` inside a buffer with GUARD sentinel elements on both
    sides (the view itself is filled with ``fill``)."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((GUARD + n + GUARD,), 7.0, dtype=dtype)
    view = buf[GUARD : GUARD + n].view(*shape)
    view.fill_(fill)
    return buf, view


def _guard_intact(buf):
    return bool((buf[:GUARD] == 7.0).all() and (buf[-GUARD:] == 7.0).all())


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("offset", [1, 2, 3, 16, 17, 2**40])
def test_raw_kv_append_positions_near_int64_max_keep_the_guard(T, offset):
    B, Lmax, H, D = 1, 16, 2, 4
    kbuf, kc = _guarded(B, Lmax, H, D)
    vbuf, vc = _guarded(B, Lmax, H, D)
    kn, vn = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    pos = torch.tensor([INT64_MAX + 1 - offset])  # pos + T overflows for offset <= T
    with pytest.raises(IndexError, match=r"positions\[0\]"):
        _cuda.kv_append(kc, vc, kn, vn, pos)
    assert _guard_intact(kbuf) and _guard_intact(vbuf)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


@pytest.mark.parametrize("rope_pos_2d", [False, True])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_raw_kv_append_rotary_positions_near_int64_max_keep_the_guard(rope_pos_2d, offset):
    B, Lmax, H, D, T, P = 1, 8, 2, 4, 3, 16
    kbuf, kc = _guarded(B, Lmax, H, D)
    vbuf, vc = _guarded(B, Lmax, H, D)
    kn, vn = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    cos, sin = torch.randn(P, D // 2), torch.randn(P, D // 2)
    start = INT64_MAX + 1 - offset
    rp = torch.full((B, T), start) if rope_pos_2d else torch.tensor([start])
    with pytest.raises(IndexError, match="rotary position"):
        _cuda.kv_append(kc, vc, kn, vn, torch.tensor([0]), rope=(cos, sin), rope_positions=rp)
    assert _guard_intact(kbuf) and _guard_intact(vbuf)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


@pytest.mark.parametrize("rope", [False, True])
def test_ops_kv_append_without_value_checks_keeps_the_guard(rope):
    from hybridkernels.ops import kv_append, skip_value_checks

    B, Lmax, H, D, T = 1, 16, 2, 4, 16
    kbuf, kc = _guarded(B, Lmax, H, D)
    vbuf, vc = _guarded(B, Lmax, H, D)
    kn, vn = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    tables = (torch.randn(64, D // 2), torch.randn(64, D // 2)) if rope else None
    for pos in (INT64_MAX - 15, INT64_MAX, 2**63 - 2**60, -1):
        with skip_value_checks(), pytest.raises((IndexError, ValueError)):
            kv_append(kc, vc, kn, vn, torch.tensor([pos]), rope=tables, backend="cuda")
    assert _guard_intact(kbuf) and _guard_intact(vbuf)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


def test_ops_kv_append_rejects_rotary_positions_that_overflow():
    from hybridkernels.ops import kv_append

    kc, vc = torch.zeros(1, 8, 2, 4), torch.zeros(1, 8, 2, 4)
    kn, vn = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    tables = (torch.randn(16, 2), torch.randn(16, 2))
    for backend in ("cuda", "reference"):
        with pytest.raises(ValueError, match="rotary position"):
            kv_append(
                kc, vc, kn, vn, torch.tensor([0]), rope=tables,
                rope_positions=torch.tensor([INT64_MAX - 1]), backend=backend,
            )  # fmt: skip
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


def test_raw_kv_append_rejects_views_whose_extent_overflows():
    B, Lmax, H, D = 1, 4, 2, 4
    kbuf, kc = _guarded(B, Lmax, H, D)
    vbuf, vc = _guarded(B, Lmax, H, D)
    kn, vn = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    pos = torch.tensor([3])
    args, _ = _args()
    args.update(
        k_cache=kc.data_ptr(), v_cache=vc.data_ptr(), k_new=kn.data_ptr(), v_new=vn.data_ptr(),
        positions=pos.data_ptr(), cache_shape=[B, Lmax, H, D], T=1, positions_dtype=4,
        k_cache_strides=[32, 2**62, 4, 1], v_cache_strides=list(vc.stride()),
        k_new_strides=list(kn.stride()), v_new_strides=list(vn.stride()),
    )  # fmt: skip
    with pytest.raises(ValueError, match="k_cache"):
        _cuda._C.kv_append(**args)
    assert _guard_intact(kbuf) and _guard_intact(vbuf)


def _decode_inputs(B=2, Hq=4, Hkv=2, D=64, Lmax=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(B, Lmax, Hkv, D, generator=g)
    v = torch.randn(B, Lmax, Hkv, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_raw_decode_attention_out_keeps_the_guard(num_splits):
    from hybridkernels import reference

    B, Hq, D = 2, 4, 64
    q, k, v = _decode_inputs(B, Hq, 2, D)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    obuf, out = _guarded(B, Hq, D)
    lbuf, lse = _guarded(B, Hq)
    _cuda.decode_attention_out(q, k, v, lens, out, lse, num_splits=num_splits)
    assert _guard_intact(obuf) and _guard_intact(lbuf)
    torch.testing.assert_close(out, reference.decode_attention(q, k, v, lens))
    for bad in ([3, 9], [-1, 2], [0, 2], [2**31 - 1, 1], [-(2**31), 1]):
        obuf, out = _guarded(B, Hq, D)
        lbuf, lse = _guarded(B, Hq)
        with pytest.raises((IndexError, ValueError)):
            _cuda.decode_attention_out(
                q, k, v, torch.tensor(bad, dtype=torch.int32), out, lse, num_splits=num_splits
            )
        assert _guard_intact(obuf) and _guard_intact(lbuf)
        assert out.abs().sum() == 0 and lse.abs().sum() == 0


def test_raw_decode_attention_rejects_a_prefix_length_that_overflows():
    B, Hq, Hkv, D, Lmax = 1, 2, 1, 64, 8
    q, k, v = _decode_inputs(B, Hq, Hkv, D, Lmax)
    kp, vp = torch.randn(4, Hkv, D), torch.randn(4, Hkv, D)
    lens = torch.tensor([2], dtype=torch.int32)
    obuf, out = _guarded(B, Hq, D)
    lbuf, lse = _guarded(B, Hq)
    for prefix_len in (INT64_MAX, INT64_MAX - 1, INT64_MAX - 8):
        with pytest.raises(ValueError, match="prefix_len"):
            _cuda._C.decode_attention(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), lens.data_ptr(), kp.data_ptr(),
                vp.data_ptr(), out.data_ptr(), lse.data_ptr(), 0, 0, list(q.shape),
                list(k.shape), [INT64_MAX, Hkv, D], prefix_len, list(q.stride()),
                list(k.stride()), list(v.stride()), list(kp.stride()), list(vp.stride()),
                list(out.stride()), list(lse.stride()), 0.125, 0, 3, 0, -1, 0,
            )  # fmt: skip
    assert _guard_intact(obuf) and _guard_intact(lbuf)
    assert out.abs().sum() == 0


def test_raw_decode_plan_rejects_sizes_whose_workspace_overflows():
    with pytest.raises(ValueError):
        _cuda._C.decode_plan([2**40, 2**20, 64], [2**40, 8, 2**20, 64], 0, 0, 4096, -1)
    with pytest.raises(ValueError):
        _cuda._C.decode_plan([2, 4, 64], [2, INT64_MAX, 2, 64], INT64_MAX, 0, 0, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_kv_append_positions_near_int64_max_keep_the_guard(rope):
    B, Lmax, H, D, T = 1, 16, 2, 8, 16
    kbuf = torch.full((GUARD + B * Lmax * H * D + GUARD,), 7.0, device="cuda")
    vbuf = kbuf.clone()
    kc = kbuf[GUARD:-GUARD].view(B, Lmax, H, D).zero_()
    vc = vbuf[GUARD:-GUARD].view(B, Lmax, H, D).zero_()
    kn, vn = torch.randn(B, T, H, D, device="cuda"), torch.randn(B, T, H, D, device="cuda")
    tables = (torch.randn(64, D // 2, device="cuda"), torch.randn(64, D // 2, device="cuda"))
    for pos in (INT64_MAX - 15, INT64_MAX, INT64_MAX - 7):
        _cuda.kv_append(kc, vc, kn, vn, torch.tensor([pos], device="cuda"), rope=tables if rope else None)
    torch.cuda.synchronize()
    assert _guard_intact(kbuf.cpu()) and _guard_intact(vbuf.cpu())
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0
