"""bidirectional_attention: the reference against SDPA, the Triton kernel against the reference
(CPU interpreter here, real kernels on a GPU), dispatch, the autograd fallback and bad inputs."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybridkernels import reference
from hybridkernels.ops import bidirectional_attention
from hybridkernels.ops._dispatch import triton_interpreting


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _padding_mask(kind, B, Lk, device="cpu", seed=1):
    """None, "left" (left-padded rows, the last row keeps a single key), or "random" (random
    holes, one row without any key)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "left":
        starts = torch.randint(0, Lk, (B,), generator=g)
        starts[-1] = Lk - 1
        mask = torch.arange(Lk)[None, :] >= starts[:, None]
    else:
        mask = torch.rand(B, Lk, generator=g) > 0.4
        mask[0] = False
        if B > 1:
            mask[1] = False
            mask[1, Lk // 2] = True
    return mask.to(device)


def _sdpa_explicit(q, k, v, mask, causal, scale=None):
    """SDPA with an explicit [B, 1, Lq, Lk] bool mask (repeated kv heads); all-masked rows -> 0."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        visible &= mask[:, None, None, :]
    if causal:
        visible &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    seen = visible.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(),
        k.repeat_interleave(Hq // Hkv, 2).transpose(1, 2).double(),
        v.repeat_interleave(Hq // Hkv, 2).transpose(1, 2).double(),
        attn_mask=visible | ~seen,
        scale=scale,
    )
    return (out * seen).transpose(1, 2)


def _skip_if_no_triton(device):
    if device.type == "cpu" and not triton_interpreting():
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 before triton is imported")


def _assert_lse_close(lse, ref_lse, atol):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize(
    "B, Lq, Lk, Hq, Hkv, D, causal, mask",
    [
        (2, 7, 7, 4, 4, 64, False, None),
        (2, 7, 129, 8, 2, 64, False, "random"),
        (3, 5, 33, 8, 1, 32, True, "left"),
        (1, 129, 129, 4, 1, 128, True, None),
    ],
)
def test_reference_matches_sdpa(B, Lq, Lk, Hq, Hkv, D, causal, mask):
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D)
    m = _padding_mask(mask, B, Lk)
    out, lse = reference.bidirectional_attention(
        q, k, v, key_padding_mask=m, causal=causal, scale=0.3, return_lse=True
    )
    expected = _sdpa_explicit(q, k, v, m, causal, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert not out.isnan().any() and not lse.isnan().any()


# ------------------------------------------------------------------------------------ triton

CASES = [
    # B, Lq, Lk, Hq, Hkv, D, causal, mask, num_splits
    (1, 1, 1, 1, 1, 64, False, None, None),
    (2, 7, 7, 4, 4, 64, False, None, None),
    (2, 129, 129, 4, 1, 64, False, "left", None),
    (2, 129, 129, 8, 1, 64, True, None, None),
    (2, 33, 129, 8, 8, 128, True, "left", None),
    (3, 1, 129, 8, 2, 128, False, "random", None),
    (2, 7, 129, 4, 1, 64, True, "random", None),
    (2, 16, 300, 8, 2, 128, False, "left", 3),
    (2, 9, 260, 8, 1, 64, True, "random", 2),
    (1, 40, 77, 2, 2, 96, True, None, None),
    (1, 20, 35, 2, 1, 32, False, "left", None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, Lq, Lk, Hq, Hkv, D, causal, mask, num_splits", CASES)
def test_triton_matches_reference(device, dtype, B, Lq, Lk, Hq, Hkv, D, causal, mask, num_splits):
    _skip_if_no_triton(device)
    from hybridkernels.triton.attention import flash_attention

    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, device)
    m = _padding_mask(mask, B, Lk, device)
    kwargs = dict(key_padding_mask=m, causal=causal, return_lse=True)
    out, lse = flash_attention(q, k, v, num_splits=num_splits, **kwargs)
    ref_out, ref_lse = reference.bidirectional_attention(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, Lq)
    assert not out.isnan().any() and not lse.isnan().any()
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=1e-3)
    _assert_lse_close(lse, ref_lse, atol=1e-4)


def test_triton_through_op_strided_inputs_and_scale(device):
    """q/k/v as views of one packed qkv buffer (non-contiguous heads), a custom scale."""
    _skip_if_no_triton(device)
    B, L, H, D = 2, 19, 4, 64
    qkv = torch.randn(B, L, 3, H, D, device=device)
    q, k, v = qkv.unbind(2)
    mask = _padding_mask("left", B, L, device)
    out = bidirectional_attention(q, k, v, key_padding_mask=mask, scale=0.2, backend="triton")
    expected = reference.bidirectional_attention(q, k, v, key_padding_mask=mask, scale=0.2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_triton_rows_without_keys_are_zero(device):
    _skip_if_no_triton(device)
    from hybridkernels.triton.attention import flash_attention

    q, k, v = _inputs(2, 5, 40, 4, 2, 64, torch.float16, device)
    mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    mask[1] = False
    for splits in (1, 2):
        out, lse = flash_attention(q, k, v, key_padding_mask=mask, return_lse=True, num_splits=splits)
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
        assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the interpreter")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq, Lk", [(300, 300), (32, 2000)])
def test_triton_bf16_cuda(causal, Lq, Lk):
    q, k, v = _inputs(2, Lq, Lk, 8, 2, 128, torch.bfloat16, "cuda")
    mask = _padding_mask("left", 2, Lk, "cuda")
    out, lse = bidirectional_attention(
        q, k, v, key_padding_mask=mask, causal=causal, return_lse=True, backend="triton"
    )
    ref_out, ref_lse = reference.bidirectional_attention(
        q, k, v, key_padding_mask=mask, causal=causal, return_lse=True
    )
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    _assert_lse_close(lse, ref_lse, atol=1e-2)


def test_plan_splits():
    pytest.importorskip("triton")
    from hybridkernels.triton.attention import plan_splits

    # enough programs: no split; a batch-1 block over a long cache: split, >= 256 keys each
    assert plan_splits(Lk=4096, programs_per_split=1024, target_programs=264) == (1, 4096)
    splits, size = plan_splits(Lk=8192, programs_per_split=8, target_programs=264)
    assert splits > 1 and size % 128 == 0 and size >= 256 and (splits - 1) * size < 8192 <= splits * size
    assert plan_splits(Lk=300, programs_per_split=1, target_programs=264)[0] == 1


def test_kernel_compile_cases_cover_every_head_dim_and_dtype():
    pytest.importorskip("triton")
    from hybridkernels.ops._checks import HEAD_DIMS
    from hybridkernels.triton import attention

    names = [case.name for case in attention._compile_cases()]
    assert attention.HEAD_DIMS == HEAD_DIMS
    for dtype in ("fp16", "bf16", "fp32"):
        for d in HEAD_DIMS:
            assert any(n.startswith(f"attn_fwd[{dtype},D={d},") for n in names)
            assert f"attn_merge_splits[{dtype},D={d}]" in names


def test_compile_cases_compile_the_block_causal_kernel():
    """The causal block size is a runtime int in every compiled case (not specialised to 1), and
    the causal masking code is on: the compile check covers ``block_causal=b``."""
    pytest.importorskip("triton")
    from hybridkernels.triton import attention

    cases = [c for c in attention._compile_cases() if c.name.startswith("attn_fwd[")]
    assert cases and all(c.signature["causal_block"] == "i32" and c.constexprs["CAUSAL"] for c in cases)


# ------------------------------------------------------------------------------------ dispatch


def test_auto_backend_on_cpu_is_reference_and_does_not_import_triton():
    code = (
        "import sys, torch, hybridkernels as hk\n"
        "q = torch.randn(1, 3, 2, 32)\n"
        "hk.ops.bidirectional_attention(q, q, q)\n"
        "assert 'hybridkernels.triton.attention' not in sys.modules\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDKERNELS_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    q, k, v = _inputs(1, 3, 5, 2, 1, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs.*CUDA"):
        bidirectional_attention(q, k, v, backend="triton")
    monkeypatch.setenv("HYBRIDKERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="HYBRIDKERNELS_BACKEND=triton.*CUDA"):
        bidirectional_attention(q, k, v)


@pytest.mark.parametrize("return_lse", [False, True])
def test_requires_grad_falls_back_to_a_differentiable_path(monkeypatch, return_lse):
    pytest.importorskip("triton")
    import hybridkernels.triton.attention as triton_attention

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward-only Triton kernel ran on inputs that require grad")

    monkeypatch.setattr(triton_attention, "flash_attention", forbidden)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend is selectable on the CPU
    q, k, v = _inputs(2, 5, 9, 4, 2, 32)
    mask = _padding_mask("random", 2, 9)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        res = bidirectional_attention(
            *leaves, key_padding_mask=mask, causal=True, return_lse=return_lse, backend=backend
        )
        out = res[0] if return_lse else res
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # without autograd the kernel runs
        with pytest.raises(AssertionError, match="forward-only"):
            bidirectional_attention(q.requires_grad_(), k, v, backend="triton")


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(Hq=6, Hkv=4), ValueError, "multiple of k/v heads"),
        (dict(D=0), ValueError, "head_dim must be >= 1, got 0"),  # issue 16: 48 runs (test_head_dims)
        (dict(Lq=9, Lk=5), ValueError, r"Lq \(9\) must be <= Lk \(5\)"),
        (dict(mask_shape=(2, 4)), ValueError, r"key_padding_mask must have shape \[B, Lk\]"),
        (dict(mask_dtype=torch.int64), TypeError, "key_padding_mask must have dtype in"),
        (dict(k_dtype=torch.float16), TypeError, "k has dtype torch.float16 but q"),
        (dict(q_ndim=3), ValueError, "q must have 4 dims"),
    ],
)
def test_bad_inputs(change, error, match):
    B, Lq, Lk = 2, change.get("Lq", 3), change.get("Lk", 5)
    Hq, Hkv, D = change.get("Hq", 4), change.get("Hkv", 2), change.get("D", 64)
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D)
    k = k.to(change.get("k_dtype", torch.float32))
    if "q_ndim" in change:
        q = q[:, 0]
    mask = torch.ones(change.get("mask_shape", (B, Lk)), dtype=change.get("mask_dtype", torch.bool))
    with pytest.raises(error, match=match):
        bidirectional_attention(q, k, v, key_padding_mask=mask, backend="reference")


def test_non_contiguous_last_dim_is_rejected():
    q, k, v = _inputs(1, 3, 5, 2, 2, 64)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        bidirectional_attention(q.transpose(1, 3).contiguous().transpose(1, 3), k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_ignores_non_finite_values_at_masked_key_slots(device, causal, num_splits, bad):
    # issue 16: NaN in V (or K) at a padded slot turned the whole row NaN; the reference ignores it.
    _skip_if_no_triton(device)
    from hybridkernels.triton.attention import flash_attention

    B, Lq, Lk, Hq, Hkv, D = 2, 5, 260, 4, 2, 64
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D, torch.float32, device)
    mask = _padding_mask("left", B, Lk, device)
    mask[:, 3] = False  # a hole in a full tile too (not only in the edge tiles)
    mask[:, 40] = False
    k, v = k.clone(), v.clone()
    v[~mask] = bad
    k[:, 40] = bad
    kwargs = dict(key_padding_mask=mask, causal=causal, return_lse=True)
    out, lse = flash_attention(q, k, v, num_splits=num_splits, **kwargs)
    ref_out, ref_lse = reference.bidirectional_attention(q, k, v, **kwargs)
    assert not ref_out.isnan().any()
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-3)
    _assert_lse_close(lse, ref_lse, atol=1e-4)


# ------------------------------------------------------------------------------------ block-causal


def _block_causal_explicit(q, k, v, mask, b):
    """The block-diffusion mask written out densely (SDAR's ``block_diffusion_attention_mask``,
    Fast-dLLM v2's ``eval_block_diff_mask``): absolute query position ``p = i + Lk - Lq`` sees
    key ``j`` iff ``j // b <= p // b``; through SDPA in float64, all-masked rows -> 0."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    p = torch.arange(Lq)[:, None] + (Lk - Lq)
    visible = (torch.arange(Lk)[None, :] // b <= p // b)[None, None].expand(B, 1, Lq, Lk)
    if mask is not None:
        visible = visible & mask[:, None, None, :].cpu()
    seen = visible.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q.cpu().transpose(1, 2).double(),
        k.cpu().repeat_interleave(Hq // Hkv, 2).transpose(1, 2).double(),
        v.cpu().repeat_interleave(Hq // Hkv, 2).transpose(1, 2).double(),
        attn_mask=visible | ~seen,
    )
    return (out * seen).transpose(1, 2)


@pytest.mark.parametrize(
    "B, Lq, Lk, Hq, Hkv, D, b, mask",
    [
        (2, 13, 13, 4, 2, 32, 4, None),
        (2, 5, 37, 4, 1, 64, 8, "left"),
        (1, 9, 9, 2, 2, 32, 1, None),
        (3, 7, 7, 2, 1, 32, 64, "random"),
    ],
)
def test_reference_block_causal_matches_dense_mask(B, Lq, Lk, Hq, Hkv, D, b, mask):
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D)
    m = _padding_mask(mask, B, Lk)
    out = reference.bidirectional_attention(q, k, v, key_padding_mask=m, block_causal=b)
    torch.testing.assert_close(out.double(), _block_causal_explicit(q, k, v, m, b), atol=1e-5, rtol=1e-5)
    if b == 1:  # block size 1 is token causal
        causal = reference.bidirectional_attention(q, k, v, key_padding_mask=m, causal=True)
        torch.testing.assert_close(out, causal)


BLOCK_CASES = [
    # B, Lq, Lk, Hq, Hkv, D, block, mask, num_splits: odd lengths, GQA, padding, blocks that do
    # (16, 32, 64) and do not (5, 7, 48) divide the interpreter's 32-key tiles, split keys.
    (2, 37, 37, 4, 2, 32, 5, None, None),
    (2, 70, 70, 4, 1, 64, 32, "left", None),
    (1, 45, 45, 2, 2, 32, 64, None, None),
    (2, 8, 45, 4, 2, 64, 8, "random", None),  # one block of queries over a cache + itself
    (2, 16, 300, 2, 1, 32, 16, "left", 3),
    (1, 24, 131, 3, 1, 32, 48, None, 2),
    (3, 7, 7, 4, 4, 32, 7, "left", None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, Lq, Lk, Hq, Hkv, D, block, mask, num_splits", BLOCK_CASES)
def test_triton_block_causal_matches_reference(device, dtype, B, Lq, Lk, Hq, Hkv, D, block, mask, num_splits):
    _skip_if_no_triton(device)
    from hybridkernels.triton.attention import flash_attention

    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed=block)
    m = _padding_mask(mask, B, Lk, device)
    kwargs = dict(key_padding_mask=m, block_causal=block, return_lse=True)
    out, lse = flash_attention(q, k, v, num_splits=num_splits, **kwargs)
    ref_out, ref_lse = reference.bidirectional_attention(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=1e-3)
    _assert_lse_close(lse, ref_lse, atol=1e-4)


def test_block_causal_tile_skipping_never_reads_invisible_keys(device):
    """Keys 64..95 hold NaN: queries 0..63 (blocks of 16) never see them, and their programs must
    not even visit those key tiles (a visited tile would bring NaN in through ``p @ V``)."""
    _skip_if_no_triton(device)
    q, k, v = _inputs(1, 96, 96, 2, 1, 32, torch.float32, device, seed=3)
    k[:, 64:], v[:, 64:] = float("nan"), float("nan")
    out = bidirectional_attention(q, k, v, block_causal=16, backend="triton")
    ref = reference.bidirectional_attention(q[:, :64], k[:, :64], v[:, :64], block_causal=16)
    torch.testing.assert_close(out[:, :64], ref, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_causal=0), "block_causal must be None or a block size >= 1"),
        (dict(block_causal=2.5), "block_causal must be None or a block size >= 1"),
        (dict(block_causal=True), "block_causal must be None or a block size >= 1"),
        (dict(block_causal=4, causal=True), "give causal=True or block_causal, not both"),
    ],
)
def test_block_causal_bad_inputs(kwargs, match):
    q, k, v = _inputs(1, 4, 4, 2, 1, 32)
    with pytest.raises(ValueError, match=match):
        bidirectional_attention(q, k, v, backend="reference", **kwargs)


def test_block_causal_sdpa_path_matches_reference():
    """The differentiable path (autograd recording) builds the block mask for SDPA."""
    from hybridkernels.ops._attention import sdpa_attention

    q, k, v = _inputs(2, 6, 19, 4, 2, 32)
    m = _padding_mask("left", 2, 19)
    out = sdpa_attention(q, k, v, key_padding_mask=m, block_causal=4)
    ref = reference.bidirectional_attention(q, k, v, key_padding_mask=m, block_causal=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the interpreter")
@pytest.mark.parametrize("Lq, Lk, block", [(300, 300, 32), (32, 2000, 32), (100, 100, 24)])
def test_triton_block_causal_bf16_cuda(Lq, Lk, block):
    q, k, v = _inputs(2, Lq, Lk, 8, 2, 128, torch.bfloat16, "cuda")
    out = bidirectional_attention(q, k, v, block_causal=block, backend="triton")
    ref = reference.bidirectional_attention(q, k, v, block_causal=block)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
