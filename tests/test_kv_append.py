"""kv_append with and without fused RoPE: the reference against HF transformers' rotary
embedding, the compiled ``_C`` path (C++ here, CUDA on a GPU) against the reference, the
float16 / bfloat16 rounding of the C++ path, and bad inputs."""

import pytest
import torch

from hybridkernels import _cuda, reference
from hybridkernels.ops import kv_append
from hybridkernels.reference.kv_cache import apply_rotary

HAS_CUDA = torch.cuda.is_available()
requires_c = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")
requires_c_cuda = pytest.mark.skipif(
    not (HAS_CUDA and _cuda.available() and _cuda.has_cuda()), reason="needs a GPU and _C built with CUDA"
)


def _tables(P, D, base=10000.0, hf_layout=False):
    """Llama rotary tables: ``[P, D/2]`` (or ``[P, D]`` = ``cat(t, t)``, HF's layout) float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.arange(P, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)) if hf_layout else (cos, sin)


def _inputs(B, Lmax, H, D, T, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return rnd(B, Lmax, H, D), rnd(B, Lmax, H, D), rnd(B, T, H, D), rnd(B, T, H, D)


def _run(backend, caches, k_new, v_new, positions, **kw):
    kc, vc = caches[0].clone(), caches[1].clone()
    kv_append(kc, vc, k_new, v_new, positions, backend=backend, **kw)
    return kc, vc


# ---------------------------------------------------------------- the reference's RoPE convention


def test_reference_rope_is_hf_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, T, H, D, P = 2, 5, 3, 64, 40
    config = LlamaConfig(
        hidden_size=H * D, num_attention_heads=H, max_position_embeddings=P, rope_theta=500000.0
    )
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(B, T, H, D)
    start = torch.tensor([0, 31])
    position_ids = start[:, None] + torch.arange(T)
    cos, sin = rotary(x, position_ids)  # [B, T, D], HF layout
    hf, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    tables = rotary(x, torch.arange(P)[None])  # [1, P, D]
    kc, vc = torch.zeros(B, 8, H, D), torch.zeros(B, 8, H, D)
    reference.kv_append(
        kc, vc, x, x, torch.tensor([3, 0]), rope=(tables[0][0], tables[1][0]), rope_positions=start
    )
    assert torch.equal(kc[0, 3:8], hf.transpose(1, 2)[0]) and torch.equal(kc[1, :5], hf.transpose(1, 2)[1])
    assert torch.equal(vc[0, 3:8], x[0])


def test_apply_rotary_formula():
    x = torch.randn(4, 8, dtype=torch.float64)
    cos, sin = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.float32
    expected = torch.cat([x[:, :4] * cos - x[:, 4:] * sin, x[:, 4:] * cos + x[:, :4] * sin], -1)
    torch.testing.assert_close(out, expected.float())


# ---------------------------------------------------------------- _C on the CPU vs the reference


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_plain_append_matches_reference(dtype, T):
    kc, vc, kn, vn = _inputs(3, 20, 2, 64, T, dtype=dtype)
    pos = torch.tensor([0, 20 - T, 5])
    ours = _run("cuda", (kc, vc), kn, vn, pos)
    ref = _run("reference", (kc, vc), kn, vn, pos)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 6])
@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("rope_pos", ["default", "start", "per_token"])
def test_rope_append_matches_reference_exactly(dtype, D, hf_layout, rope_pos):
    # Same float32 arithmetic, one rounding: the C++ path's hand-written fp16 / bf16 rounding
    # must agree with torch's bit for bit.
    B, Lmax, H, T, P = 3, 24, 2, 4, 64
    kc, vc, kn, vn = _inputs(B, Lmax, H, D, T, dtype=dtype, seed=D)
    pos = torch.tensor([0, 20, 9], dtype=torch.int32)
    rope = _tables(P, D, hf_layout=hf_layout)
    rp = {
        "default": None,
        "start": torch.tensor([60, 0, 33]),
        "per_token": torch.tensor([[0, 0, 1, 2], [5, 6, 7, 63], [9, 10, 11, 12]]),
    }[rope_pos]
    ours = _run("cuda", (kc, vc), kn, vn, pos, rope=rope, rope_positions=rp)
    ref = _run("reference", (kc, vc), kn, vn, pos, rope=rope, rope_positions=rp)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.equal(ours[1][1, 20:24], vn[1])  # values copied, not rotated
    assert not torch.equal(ours[0][1, 20:24], kn[1])


@requires_c
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_edge_cases(dtype):
    # k = (1, 0) pairs and a cos table holding the test values: the rotated key is cos itself,
    # rounded by the C++ conversion. Ties, subnormals, overflow, inf and NaN.
    info = torch.finfo(dtype)
    values = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), -float("inf"),
         6e-8, 2.98e-8, 2.9802322e-08, 1e-9, 6.1e-5, 5.9e-5, -3e-6, 1.0009765625, 1.00048828125,
         1.000732421875, 1.00390625, 1.001953125, 1.005859375, 3.0e38, info.tiny, info.tiny / 3,
         1e-40, -1e-40, 0.1, 1 / 3]
    )  # fmt: skip
    n = values.numel()
    cos = values[None, :].clone()
    sin = torch.zeros(1, n)
    k_new = torch.cat([torch.ones(n), torch.zeros(n)]).to(dtype)[None, None, None]
    kc = torch.zeros(1, 1, 1, 2 * n, dtype=dtype)
    kv_append(kc, kc.clone(), k_new, k_new, torch.tensor([0]), rope=(cos, sin), backend="cuda")
    assert torch.equal(kc[0, 0, 0, :n], values.to(dtype))
    nan = torch.full((1, n), float("nan"))
    kv_append(kc, kc.clone(), k_new, k_new, torch.tensor([0]), rope=(nan, sin), backend="cuda")
    assert kc[0, 0, 0, :n].isnan().all()


@requires_c
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_key_value_converts_exactly(dtype):
    # cos = 1, sin = 0 and k = (x, 0): the rotated first half is x itself, so every finite bit
    # pattern of the dtype (subnormals, signed zeros, the largest values) and +-inf must
    # survive the C++ path's conversion to float and back unchanged.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    n = x.numel()
    k_new = torch.cat([x, torch.zeros(n, dtype=dtype)])[None, None, None]
    kc = torch.zeros(1, 1, 1, 2 * n, dtype=dtype)
    rope = (torch.ones(1, n), torch.zeros(1, n))
    kv_append(kc, kc.clone(), k_new, k_new, torch.tensor([0]), rope=rope, backend="cuda")
    got = kc[0, 0, 0, :n]
    nan = x.isnan()
    assert torch.equal(got[~nan].view(torch.int16), x[~nan].view(torch.int16))
    assert got[nan].isnan().all()


@requires_c
def test_rope_on_strided_views():
    B, Lmax, H, D, T = 2, 10, 2, 8, 3
    buf = torch.zeros(B, Lmax, H, 2, D)
    kc, vc = buf[:, :, :, 0], buf[:, :, :, 1]
    kn = torch.randn(B, T, H, 2 * D)[..., ::2]  # non-contiguous head dim
    vn = torch.randn(B, T, H, D)
    pos = torch.tensor([1, 7])
    rope = _tables(16, D)
    kv_append(kc, vc, kn, vn, pos, rope=rope, backend="cuda")
    ref = _run("reference", (torch.zeros(B, Lmax, H, D), torch.zeros(B, Lmax, H, D)), kn, vn, pos, rope=rope)
    assert torch.equal(kc, ref[0]) and torch.equal(vc, ref[1])


@requires_c
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_c_cuda)])
@pytest.mark.parametrize("rope", [False, True])
def test_strided_positions(device, rope):
    # positions as a column of a [B, 2] buffer (stride 2): _C reads it without a stride.
    kc, vc, kn, vn = _inputs(3, 20, 2, 64, 2, device=device)
    pos = torch.tensor([[3, 0], [18, 0], [9, 0]], device=device)[:, 0]
    kw = {"rope": tuple(t.to(device) for t in _tables(32, 64))} if rope else {}
    ours = _run("cuda", (kc, vc), kn, vn, pos, **kw)
    ref = _run("reference", (kc, vc), kn, vn, pos.contiguous(), **kw)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(ours[1], ref[1])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda a: a.update(kn=a["kn"].half()), TypeError, "k_new has dtype"),
        (lambda a: a.update(pos=torch.tensor([0, 9])), ValueError, r"positions\[1\] = 9"),
        (lambda a: a.update(pos=torch.tensor([-1, 0])), ValueError, r"positions\[0\] = -1"),
        (lambda a: a.update(pos=torch.tensor([0])), ValueError, "positions must have shape"),
        (lambda a: a.update(vn=a["vn"][:, :1]), ValueError, "v_new must have shape"),
        (lambda a: a.update(kn=a["kn"][..., :4]), ValueError, "k_new must have shape"),
        (lambda a: a.update(rope=(a["rope"][0].half(), a["rope"][1])), TypeError, "rope cos"),
        (lambda a: a.update(rope=(a["rope"][0][:, :3], a["rope"][1][:, :3])), ValueError, r"\[P, D/2\]"),
        (lambda a: a.update(rope=(a["rope"][0], a["rope"][1][:5])), ValueError, "rope sin must have shape"),
        (lambda a: a.update(rope=a["rope"][0]), TypeError, "rope must be a tuple"),
        (lambda a: a.update(rp=torch.tensor([0, 14])), ValueError, "rotary position 14"),
        (lambda a: a.update(rp=torch.tensor([[0, 1, 2], [3, 4, 16]])), ValueError, "rotary position 16"),
        (lambda a: a.update(rp=torch.tensor([0, 1, 2])), ValueError, "rope_positions must have shape"),
        (lambda a: a.update(rp=torch.tensor([0.0, 1.0])), TypeError, "rope_positions"),
        (lambda a: a.update(rope=None, rp=torch.tensor([0, 1])), ValueError, "rope .cos, sin. is not"),
    ],
)
def test_rejects_bad_inputs(mutate, exc, words):
    kc, vc, kn, vn = _inputs(2, 8, 2, 8, 3)
    args = dict(kn=kn, vn=vn, pos=torch.tensor([0, 5]), rope=_tables(16, 8), rp=None)
    mutate(args)
    with pytest.raises(exc, match=words):
        kv_append(kc, vc, args["kn"], args["vn"], args["pos"], rope=args["rope"], rope_positions=args["rp"])


def test_odd_head_dim_with_rope_is_rejected():
    kc, vc, kn, vn = _inputs(1, 4, 1, 5, 1)
    with pytest.raises(ValueError, match="even head_dim"):
        kv_append(kc, vc, kn, vn, torch.tensor([0]), rope=_tables(4, 6))


@requires_c
def test_compiled_path_checks_rotary_positions_before_writing(monkeypatch):
    monkeypatch.setenv("HYBRIDKERNELS_SKIP_VALUE_CHECKS", "1")
    kc, vc = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
    _, _, kn, vn = _inputs(2, 8, 2, 8, 3)
    with pytest.raises(IndexError, match="rotary position 16 of row 1, token 2"):
        kv_append(
            kc,
            vc,
            kn,
            vn,
            torch.tensor([0, 5]),
            rope=_tables(16, 8),
            rope_positions=torch.tensor([0, 14]),
            backend="cuda",
        )
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


@requires_c
@pytest.mark.parametrize(
    "override, words",
    [
        ({"rope_sin": 0}, "rope sin: null data pointer"),
        ({"rope_dtype": 1}, "expected float32"),
        ({"rope_shape": [16, 3]}, "columns"),
        ({"rope_shape": [16]}, "2-d table"),
        ({"rope_cos_strides": [4, 2]}, "contiguous"),
        ({"rope_sin_strides": [8, 1]}, "same row stride"),
        ({"rope_positions_shape": [3]}, "rope_positions: expected shape"),
        ({"rope_positions_dtype": 0}, "rope_positions_dtype"),
    ],
)
def test_raw_rope_arguments_are_checked(override, words):
    kc, vc = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
    _, _, kn, vn = _inputs(2, 8, 2, 8, 3)
    pos, rp = torch.tensor([0, 5]), torch.tensor([1, 2])
    cos, sin = _tables(16, 8)
    args = dict(
        rope_cos=cos.data_ptr(),
        rope_sin=sin.data_ptr(),
        rope_dtype=0,
        rope_shape=list(cos.shape),
        rope_cos_strides=list(cos.stride()),
        rope_sin_strides=list(sin.stride()),
        rope_positions=rp.data_ptr(),
        rope_positions_dtype=4,
        rope_positions_shape=[2],
        rope_positions_strides=[1],
    )
    args.update(override)
    with pytest.raises(ValueError, match=words):
        _cuda._C.kv_append(
            kc.data_ptr(), vc.data_ptr(), kn.data_ptr(), vn.data_ptr(), pos.data_ptr(), list(kc.shape), 3,
            list(kc.stride()), list(vc.stride()), list(kn.stride()), list(vn.stride()), 0, 4, -1, 0, **args,
        )  # fmt: skip
    assert kc.abs().sum() == 0


@requires_c
def test_custom_op_registration_with_rope():
    kc, vc, kn, vn = _inputs(2, 8, 2, 8, 3)
    cos, sin = _tables(16, 8)
    args = (kc, vc, kn, vn, torch.tensor([0, 5]), cos, sin, torch.tensor([[1, 2, 3], [0, 0, 0]]))
    torch.library.opcheck(torch.ops.hybridkernels.kv_append.default, args)


# ---------------------------------------------------------------- CUDA kernels (GPU only)


@requires_c_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 6])  # 6: pairs too short for vectors
@pytest.mark.parametrize("hf_layout", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_rope_matches_cpu(dtype, D, hf_layout, strided):
    B, Lmax, H, T, P = 3, 40, 4, 5, 128
    kc, vc, kn, vn = _inputs(B, Lmax, H, D, T, dtype=dtype, seed=D)
    if strided:
        kn = torch.cat([kn, kn], dim=-1)[..., ::2]  # non-contiguous head dim: scalar path
    pos = torch.tensor([0, 35, 11], dtype=torch.int32)
    rp = torch.tensor([100, 3, 0])
    rope = _tables(P, D, hf_layout=hf_layout)
    cpu = _run("cuda", (kc, vc), kn, vn, pos, rope=rope, rope_positions=rp)
    gpu = _run(
        "cuda",
        (kc.cuda(), vc.cuda()),
        kn.cuda(),
        vn.cuda(),
        pos.cuda(),
        rope=(rope[0].cuda(), rope[1].cuda()),
        rope_positions=rp.cuda(),
    )
    # The GPU may fuse the multiply-adds: the same float result up to an ulp before rounding.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=tol, rtol=tol)
    assert torch.equal(gpu[1].cpu(), cpu[1])
