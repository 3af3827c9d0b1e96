"""decode_attention: the compiled ``_C`` path (C++ on the CPU here, CUDA kernels on a GPU) against
the reference op: ragged lengths, GQA, shared prefix (cascade), forced split counts (the
log-sum-exp merge), every dtype, return_lse, poisoned outputs, dispatch and bad inputs."""

import pytest
import torch

from hybridkernels import _cuda, reference
from hybridkernels.ops import OP_BACKENDS, decode_attention, kv_append

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_c = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")
requires_c_cuda = pytest.mark.skipif(
    not (HAS_CUDA and _cuda.available() and _cuda.has_cuda()), reason="needs a GPU and _C built with CUDA"
)

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def _inputs(B, Hq, Hkv, D, Lmax, *, dtype=torch.float32, device="cpu", lens=None, prefix=0, seed=0):
    """q, caches, cache_lens (random in 1..Lmax unless given) and an optional prefix
    ``(k, v, prefix)`` stored in 3 spare rows more than it uses."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B, Hq, D), rnd(B, Lmax, Hkv, D), rnd(B, Lmax, Hkv, D)
    if lens is None:
        lens = torch.randint(1, Lmax + 1, (B,), generator=g)
    cache_lens = torch.as_tensor(lens, dtype=torch.int32).to(device)
    pre = (rnd(prefix + 3, Hkv, D), rnd(prefix + 3, Hkv, D), prefix) if prefix else None
    return q, k, v, cache_lens, pre


def _check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- _C on the CPU vs the reference


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (16, 2)])  # GQA 1 / 4 / 8
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("prefix", [0, 37])
def test_cpu_matches_reference(dtype, Hq, Hkv, D, prefix):
    # Lengths 1 .. ~1k, every row different, including a single-key row and a full row.
    lens = [1, 1000, 129, 64]
    q, k, v, cache_lens, pre = _inputs(4, Hq, Hkv, D, 1000, dtype=dtype, lens=lens, prefix=prefix)
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    out, lse = decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, backend="cuda")
    _check(out, lse, ref_out, ref_lse, dtype)


@requires_c
@pytest.mark.parametrize("num_splits", [1, 2, 7, 40])
@pytest.mark.parametrize("prefix", [0, 70])
def test_cpu_split_merge_matches_reference(num_splits, prefix):
    # Forced split counts run the CUDA path's split plan and log-sum-exp merge on the CPU; 40
    # splits leave the short rows' trailing splits empty.
    q, k, v, cache_lens, pre = _inputs(3, 8, 2, 64, 300, lens=[300, 5, 131], prefix=prefix, seed=1)
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    out, lse = _cuda.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, num_splits=num_splits)
    _check(out, lse, ref_out, ref_lse, torch.float32)


@requires_c
def test_scale_and_lse_convention():
    q, k, v, cache_lens, _ = _inputs(2, 4, 2, 64, 50, seed=2)
    out, lse = decode_attention(q, k, v, cache_lens, scale=0.3, return_lse=True, backend="cuda")
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, scale=0.3, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float32)
    # lse is the natural log of sum(exp(scale * q.k)) over the attended keys.
    b, h = 1, 3
    n = int(cache_lens[b])
    scores = 0.3 * (k[b, :n, h // 2] @ q[b, h])
    torch.testing.assert_close(lse[b, h], torch.logsumexp(scores, 0), atol=1e-4, rtol=1e-5)


@requires_c
def test_zero_length_rows_attend_only_the_prefix():
    q, k, v, _, pre = _inputs(3, 8, 2, 64, 40, prefix=9, seed=3)
    cache_lens = torch.tensor([0, 17, 0], dtype=torch.int32)
    out, lse = decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, backend="cuda")
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float32)
    # Row 0 sees the prefix alone: plain attention over the 9 prefix keys.
    kp, vp, n = pre
    alone = reference.bidirectional_attention(q[:1, None], kp[None, :n], vp[None, :n])[:, 0]
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


@requires_c
def test_prefix_of_length_zero_is_no_prefix():
    q, k, v, cache_lens, pre = _inputs(2, 4, 4, 64, 30, prefix=5, seed=4)
    empty = (pre[0], pre[1], 0)
    torch.testing.assert_close(
        decode_attention(q, k, v, cache_lens, prefix=empty, backend="cuda"),
        decode_attention(q, k, v, cache_lens, backend="cuda"),
    )


@requires_c
@pytest.mark.parametrize("num_splits", [0, 3])
def test_poisoned_output_is_fully_written(num_splits):
    q, k, v, cache_lens, pre = _inputs(3, 8, 2, 128, 90, prefix=6, seed=5)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((3, 8), float("nan"))
    _cuda.decode_attention_out(q, k, v, cache_lens, out, lse, prefix=pre, num_splits=num_splits)
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float32)


@requires_c
def test_out_buffer_views_leave_their_neighbours_alone():
    q, k, v, cache_lens, _ = _inputs(2, 4, 2, 64, 33, seed=6)
    buf = torch.full((2, 4, 2, 64), float("nan"))  # out is every other head slot of buf
    out, lse_buf = buf[:, :, 0], torch.full((4, 2), float("nan"))
    _cuda.decode_attention_out(q, k, v, cache_lens, out, lse_buf.t())
    torch.testing.assert_close(out, reference.decode_attention(q, k, v, cache_lens))
    assert buf[:, :, 1].isnan().all() and not lse_buf.isnan().any()


@requires_c
@pytest.mark.parametrize(
    "out_kw, exc",
    [
        (dict(dtype=torch.bfloat16), TypeError),  # 4-byte values into 2-byte slots
        (dict(size=(2, 3, 64)), ValueError),
        (dict(lse_dtype=torch.float16), TypeError),
        (dict(lse_size=(2, 2)), ValueError),
    ],
)
def test_out_buffers_are_checked(out_kw, exc):
    q, k, v, cache_lens, _ = _inputs(2, 4, 2, 64, 20, seed=9)
    out = torch.zeros(out_kw.get("size", (2, 4, 64)), dtype=out_kw.get("dtype", q.dtype))
    lse = torch.zeros(out_kw.get("lse_size", (2, 4)), dtype=out_kw.get("lse_dtype", torch.float32))
    with pytest.raises(exc, match="decode_attention_out"):
        _cuda.decode_attention_out(q, k, v, cache_lens, out, lse)


@requires_c
def test_strided_inputs():
    # q and caches as views into larger buffers (head-dim contiguous, other strides arbitrary).
    q, k, v, cache_lens, pre = _inputs(2, 8, 2, 64, 45, prefix=4, seed=7)
    kv = torch.stack([k, v], dim=3)  # [B, L, Hkv, 2, D]
    qs = torch.cat([q, q], dim=-1)[..., :64]
    out = decode_attention(qs, kv[:, :, :, 0], kv[:, :, :, 1], cache_lens, prefix=pre, backend="cuda")
    torch.testing.assert_close(out, reference.decode_attention(q, k, v, cache_lens, prefix=pre))


@requires_c
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_c_cuda)])
def test_strided_cache_lens(device):
    # cache_lens as a column of a [B, 2] buffer (stride 2): _C reads it without a stride.
    q, k, v, _, pre = _inputs(3, 4, 2, 64, 40, device=device, prefix=5, seed=8)
    lens = torch.tensor([[5, 0], [40, 0], [17, 0]], dtype=torch.int32, device=device)[:, 0]
    out, lse = decode_attention(q, k, v, lens, prefix=pre, return_lse=True, backend="cuda")
    ref_out, ref_lse = reference.decode_attention(q, k, v, lens.contiguous(), prefix=pre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float32)


@requires_c
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_c_cuda)])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_nan_propagates_like_the_reference(device, num_splits):
    # A NaN in q makes every score of that head NaN; a NaN in one key only one score. Either
    # way the softmax row is NaN (never silently 0 / -inf, split or not).
    q, k, v, cache_lens, pre = _inputs(2, 4, 2, 64, 300, device=device, lens=[300, 200], prefix=20)
    q[0, 1, 3] = float("nan")
    k[1, 150, 1, 0] = float("nan")  # row 1, kv head 1: q heads 2 and 3
    out, lse = _cuda.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, num_splits=num_splits)
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    assert ref_lse.isnan().sum() == 3
    torch.testing.assert_close(out, ref_out, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, equal_nan=True, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- dispatch and bad inputs


@requires_c
def test_auto_picks_the_compiled_path_on_cpu(monkeypatch):
    monkeypatch.delenv("HYBRIDKERNELS_BACKEND", raising=False)
    calls = []
    monkeypatch.setitem(
        OP_BACKENDS["decode_attention"].implementations, "cuda", lambda *a, **kw: calls.append("cuda")
    )
    q, k, v, cache_lens, _ = _inputs(1, 2, 2, 64, 8)
    decode_attention(q, k, v, cache_lens)
    assert calls == ["cuda"]


@requires_c
def test_unsupported_head_dim_errors_when_forced_and_falls_back_on_auto(monkeypatch):
    monkeypatch.delenv("HYBRIDKERNELS_BACKEND", raising=False)
    q, k, v, cache_lens, _ = _inputs(2, 4, 2, 32, 20, seed=8)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q, k, v, cache_lens, backend="cuda")
    torch.testing.assert_close(
        decode_attention(q, k, v, cache_lens), reference.decode_attention(q, k, v, cache_lens)
    )


def test_empty_batch_falls_back_to_the_reference():
    q, k, v, _, _ = _inputs(1, 4, 2, 64, 5)
    out = decode_attention(q[:0], k[:0], v[:0], torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 4, 64)


def test_rejects_zero_length_rows_without_prefix():
    q, k, v, _, _ = _inputs(2, 4, 2, 64, 10)
    with pytest.raises(ValueError, match=r"cache_lens\[1\] = 0"):
        decode_attention(q, k, v, torch.tensor([3, 0], dtype=torch.int32))


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda a: a.update(k=a["k"].half()), TypeError, "k_cache has dtype"),
        (lambda a: a.update(q=a["q"].bfloat16(), k=a["k"].bfloat16()), TypeError, "v_cache has dtype"),
        (lambda a: a.update(lens=a["lens"].long()), TypeError, "cache_lens"),
        (lambda a: a.update(lens=torch.tensor([3, 11], dtype=torch.int32)), ValueError, "Lmax = 10"),
        (lambda a: a.update(lens=a["lens"][:1]), ValueError, "cache_lens must have shape"),
        (lambda a: a.update(k=a["k"][:, :, :, :32]), ValueError, "k_cache must have shape"),
        (lambda a: a.update(v=a["v"][:, :9]), ValueError, "v_cache must have shape"),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of cache heads"),
        (lambda a: a.update(q=a["q"][:1]), ValueError, "k_cache must have shape"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contiguous"),
        (lambda a: a.update(prefix=(a["k"][0], a["v"][0], 11)), ValueError, "prefix_len = 11"),
        (lambda a: a.update(prefix=(a["k"][0], a["v"][0, :5], 2)), ValueError, "prefix v"),
        (lambda a: a.update(prefix=(a["k"][0], a["v"][0])), TypeError, "prefix must be a tuple"),
        (lambda a: a.update(scale=float("inf")), ValueError, "scale"),
    ],
)
def test_rejects_bad_inputs(mutate, exc, words):
    q, k, v, lens, _ = _inputs(2, 4, 2, 64, 10, lens=[3, 10])
    args = dict(q=q, k=k, v=v, lens=lens, prefix=None, scale=None)
    mutate(args)
    with pytest.raises(exc, match=words):
        decode_attention(
            args["q"], args["k"], args["v"], args["lens"], prefix=args["prefix"], scale=args["scale"]
        )


@requires_c
def test_compiled_path_checks_lengths_itself(monkeypatch):
    # With the op's value checks off, _C still rejects out-of-range lengths instead of reading
    # past the cache.
    monkeypatch.setenv("HYBRIDKERNELS_SKIP_VALUE_CHECKS", "1")
    q, k, v, _, _ = _inputs(2, 4, 2, 64, 10)
    with pytest.raises(IndexError, match=r"cache_lens\[1\] = 11"):
        decode_attention(q, k, v, torch.tensor([3, 11], dtype=torch.int32), backend="cuda")
    with pytest.raises(ValueError, match="attends no key"):
        decode_attention(q, k, v, torch.tensor([0, 2], dtype=torch.int32), backend="cuda")


def _raw_args(**override):
    q, k, v, lens, _ = _inputs(2, 4, 2, 64, 10, lens=[3, 10])
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    args = dict(
        q=q.data_ptr(),
        k_cache=k.data_ptr(),
        v_cache=v.data_ptr(),
        cache_lens=lens.data_ptr(),
        k_prefix=0,
        v_prefix=0,
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        workspace=0,
        workspace_floats=0,
        q_shape=list(q.shape),
        cache_shape=list(k.shape),
        prefix_shape=[],
        prefix_len=0,
        q_strides=list(q.stride()),
        k_cache_strides=list(k.stride()),
        v_cache_strides=list(v.stride()),
        k_prefix_strides=[],
        v_prefix_strides=[],
        out_strides=list(out.stride()),
        lse_strides=list(lse.stride()),
        scale=0.125,
        dtype=0,
        cache_lens_dtype=3,
        num_splits=0,
        device=-1,
        stream=0,
    )
    args.update(override)
    return args, (q, k, v, lens, out, lse)


@requires_c
def test_raw_decode_writes_the_reference_result():
    args, (q, k, v, lens, out, lse) = _raw_args()
    _cuda._C.decode_attention(**args)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lens, scale=0.125, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float32)


@requires_c
@pytest.mark.parametrize(
    "override, words",
    [
        ({"q": 0}, "q: null data pointer"),
        ({"cache_lens": 0}, "cache_lens: null data pointer"),
        ({"out": 0}, "out: null data pointer"),
        ({"lse": 0}, "lse: null data pointer"),
        ({"q_shape": [2, 4]}, "q_shape"),
        ({"q_shape": [2, 3, 64]}, "multiple of cache heads"),
        ({"q_shape": [2, 4, 96], "cache_shape": [2, 10, 2, 96]}, "head_dim 96"),
        ({"cache_shape": [3, 10, 2, 64]}, "cache_shape"),
        ({"k_cache_strides": [1280, 128, 64, 2]}, "contiguous"),
        ({"q_strides": [256, 64]}, "expected 3 strides"),
        ({"v_cache_strides": [1280, 128, -64, 1]}, "negative stride"),
        ({"dtype": 5}, "dtype"),
        ({"cache_lens_dtype": 4}, "cache_lens_dtype"),
        ({"num_splits": -1}, "num_splits"),
        ({"scale": float("nan")}, "scale"),
        ({"prefix_len": 2}, "prefix_shape"),
        ({"prefix_len": 4, "prefix_shape": [3, 2, 64], "k_prefix": 1, "v_prefix": 1}, "prefix_len: 4"),
        ({"prefix_len": 2, "prefix_shape": [3, 2, 64]}, "k_prefix: null data pointer"),
        ({"device": -3}, "device"),
    ],
)
def test_raw_decode_rejects_bad_arguments(override, words):
    args, (*_, out, lse) = _raw_args(**override)
    out.fill_(7.0)
    with pytest.raises(ValueError, match=words):
        _cuda._C.decode_attention(**args)
    assert (out == 7.0).all()


@requires_c
def test_raw_decode_on_a_device_without_cuda_raises():
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    args, _ = _raw_args(device=0)
    with pytest.raises((ValueError, RuntimeError)):
        _cuda._C.decode_attention(**args)


@requires_c
def test_custom_op_registration():
    q, k, v, lens, pre = _inputs(2, 4, 2, 64, 12, prefix=3)
    ops = torch.ops.hybridkernels
    torch.library.opcheck(ops.decode_attention.default, (q, k, v, lens, pre[0], pre[1], 3, 0.125, 0))
    torch.library.opcheck(ops.decode_attention.default, (q, k, v, lens, None, None, 0, 0.125, 2))
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    torch.library.opcheck(
        ops.decode_attention_out.default, (q, k, v, lens, None, None, 0, out, lse, 0.125, 0)
    )


# ---------------------------------------------------------------- CUDA kernels (GPU only)


@requires_c_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq, Hkv", [(8, 8), (16, 4), (16, 2), (12, 2), (6, 1)])  # GQA 1, 4, 8, 6, 6
@pytest.mark.parametrize("prefix", [0, 300])
def test_cuda_matches_cpu_and_reference(dtype, D, Hq, Hkv, prefix):
    lens = [1, 4096, 777, 33, 2048]
    args = _inputs(5, Hq, Hkv, D, 4096, dtype=dtype, lens=lens, prefix=prefix, seed=D + Hq)
    q, k, v, cache_lens, pre = args
    gpu = [t.cuda() for t in (q, k, v, cache_lens)]
    gpre = None if pre is None else (pre[0].cuda(), pre[1].cuda(), prefix)
    out, lse = decode_attention(*gpu, prefix=gpre, return_lse=True, backend="cuda")
    ref_out, ref_lse = reference.decode_attention(*gpu, prefix=gpre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, dtype)
    cpu_out, cpu_lse = decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, backend="cuda")
    _check(out, lse, cpu_out, cpu_lse, dtype)


@requires_c_cuda
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 64, 1000])
def test_cuda_forced_splits(num_splits):
    q, k, v, cache_lens, pre = _inputs(
        3, 32, 8, 128, 1500, dtype=torch.bfloat16, device="cuda", lens=[1500, 1, 600], prefix=40
    )
    out, lse = _cuda.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True, num_splits=num_splits)
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.bfloat16)


@requires_c_cuda
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_cuda_poisoned_output_is_fully_written(num_splits):
    q, k, v, cache_lens, pre = _inputs(4, 16, 4, 128, 700, dtype=torch.float16, device="cuda", prefix=20)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((4, 16), float("nan"), device="cuda")
    _cuda.decode_attention_out(q, k, v, cache_lens, out, lse, prefix=pre, num_splits=num_splits)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = reference.decode_attention(q, k, v, cache_lens, prefix=pre, return_lse=True)
    _check(out, lse, ref_out, ref_lse, torch.float16)


@requires_c_cuda
def test_cuda_graph_replay_follows_cache_lens():
    q, k, v, cache_lens, pre = _inputs(4, 8, 2, 64, 512, dtype=torch.bfloat16, device="cuda", prefix=16)
    decode_attention(q, k, v, cache_lens, prefix=pre, backend="cuda")  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, cache_lens, prefix=pre, backend="cuda")
    for lens in ([1, 2, 3, 4], [512, 100, 7, 300]):
        cache_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.decode_attention(q, k, v, cache_lens, prefix=pre)
        torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])


@requires_c_cuda
def test_cuda_misaligned_inputs_error_when_forced_and_fall_back_on_auto(monkeypatch):
    monkeypatch.delenv("HYBRIDKERNELS_BACKEND", raising=False)
    q, k, v, cache_lens, _ = _inputs(2, 4, 2, 64, 20, dtype=torch.float16, device="cuda")
    kbuf = torch.empty(k.numel() + 1, dtype=k.dtype, device="cuda")
    k_odd = kbuf[1:].view_as(k)  # 2-byte offset: no 16-byte loads
    k_odd.copy_(k)
    with pytest.raises(ValueError, match="16-byte"):
        decode_attention(q, k_odd, v, cache_lens, backend="cuda")
    torch.testing.assert_close(
        decode_attention(q, k_odd, v, cache_lens), reference.decode_attention(q, k, v, cache_lens)
    )


@requires_c_cuda
def test_cuda_rejects_host_pointers():
    args, _ = _raw_args(device=0)
    with pytest.raises(ValueError, match="host memory|not a CUDA pointer"):
        _cuda._C.decode_attention(**args)


@requires_c
@pytest.mark.parametrize(
    "B, Hq, Hkv, D, prefix, dtype",
    [
        (1, 4, 4, 64, 0, torch.float32),
        (3, 8, 2, 64, 0, torch.float32),  # GQA, ragged rows
        (2, 4, 1, 128, 5, torch.float32),  # shared prefix (cascade)
        (3, 4, 2, 64, 0, torch.float16),
        (2, 4, 2, 128, 3, torch.bfloat16),
    ],
)
def test_static_decode_kernels_equal_the_ops(B, Hq, Hkv, D, prefix, dtype):
    """The executor's direct CPU path (StaticDecodeKernels: _C called with pointers converted
    once) writes the same cache slots and returns the same attention as ops.kv_append +
    ops.decode_attention, for every layer of a [layers, B, Lmax, Hkv, D] cache, with ragged
    append positions, GQA, a shared prefix and every dtype; its output is a per-layer view."""
    layers, Lmax = 3, 11
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    k_cache, v_cache = rnd(layers, B, Lmax, Hkv, D), rnd(layers, B, Lmax, Hkv, D)
    append_at = torch.randint(0, Lmax - 1, (B,), generator=g).to(torch.int32)
    cache_lens = append_at + 1
    pre = None
    if prefix:
        pk, pv = rnd(layers, 1, prefix + 2, Hkv, D), rnd(layers, 1, prefix + 2, Hkv, D)
        pre = (pk, pv, prefix)
    kernels = _cuda.StaticDecodeKernels(k_cache, v_cache, append_at, cache_lens, num_heads=Hq, prefix=pre)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for layer in range(layers):
        q, k, v = rnd(B, 1, Hq, D), rnd(B, 1, Hkv, D), rnd(B, 1, Hkv, D)
        kv_append(want_k[layer], want_v[layer], k, v, append_at, backend="cuda")
        layer_prefix = None if pre is None else (pre[0][layer, 0], pre[1][layer, 0], prefix)
        want = decode_attention(
            q[:, 0], want_k[layer], want_v[layer], cache_lens, prefix=layer_prefix, backend="cuda"
        )
        got = kernels(layer, q, k, v)
        assert got.shape == (B, 1, Hq, D) and got.dtype == dtype
        assert torch.equal(got[:, 0], want)
        torch.testing.assert_close(got[:, 0], reference.decode_attention(
            q[:, 0], want_k[layer], want_v[layer], cache_lens, prefix=layer_prefix
        ), **TOL[dtype])  # fmt: skip
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@requires_c
def test_static_decode_kernels_refuse_layouts_they_cannot_take():
    k = torch.zeros(2, 1, 8, 2, 64)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        _cuda.StaticDecodeKernels(k.transpose(2, 3), k, lens, lens, num_heads=2)
    with pytest.raises(TypeError, match="int32"):
        _cuda.StaticDecodeKernels(k, k.clone(), lens.long(), lens, num_heads=2)
