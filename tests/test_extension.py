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
