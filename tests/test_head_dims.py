"""Issue 16 §3: any valid model runs on the CPU. The reference takes any head_dim; the Triton
attention kernels (head_dim in ``ops.HEAD_DIMS``) and the ``_C`` decode kernels (64, 128) fall
back to the reference (or SDPA on a GPU) on other head dims instead of raising, with one warning
per (op, reason); ``hybridkernels info`` says which head dims the kernels cover."""

import warnings

import pytest
import torch
from test_executor import hf_model

from hybridkernels import ops, reference
from hybridkernels.models import ARExecutor
from hybridkernels.ops import _dispatch

HEAD_DIMS = (8, 16, 48, 80, 96, 128)


def _qkv(D, B=2, Lq=3, Lk=7, Hq=4, Hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, D, generator=g) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))


def _naive_attention(q, k, v, mask=None, causal=False):
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D**0.5
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        visible &= mask[:, None, None, :]
    if causal:
        visible &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).float()


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.delenv("HYBRIDKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_WARNED", set(), raising=False)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_takes_any_head_dim(D, backend, causal):
    q, k, v = _qkv(D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    out = ops.bidirectional_attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    torch.testing.assert_close(out, _naive_attention(q, k, v, mask, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_decode_attention_and_kv_append_take_any_head_dim(D, backend):
    g = torch.Generator().manual_seed(D)
    B, Hq, Hkv, Lmax = 2, 4, 2, 9
    k_cache, v_cache = torch.zeros(B, Lmax, Hkv, D), torch.zeros(B, Lmax, Hkv, D)
    k_new, v_new = torch.randn(B, 5, Hkv, D, generator=g), torch.randn(B, 5, Hkv, D, generator=g)
    ops.kv_append(k_cache, v_cache, k_new, v_new, torch.tensor([0, 2]), backend=backend)
    assert torch.equal(k_cache[0, :5], k_new[0]) and torch.equal(v_cache[1, 2:7], v_new[1])
    q = torch.randn(B, Hq, D, generator=g)
    lens = torch.tensor([5, 7], dtype=torch.int32)
    out = ops.decode_attention(q, k_cache, v_cache, lens, backend=backend)
    torch.testing.assert_close(out, reference.decode_attention(q, k_cache, v_cache, lens))


def test_triton_env_backend_falls_back_on_an_unsupported_head_dim_with_one_warning(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("HYBRIDKERNELS_BACKEND", "triton")
    q, k, v = _qkv(16)
    with pytest.warns(RuntimeWarning, match="head_dim 16.*reference"):
        out = ops.bidirectional_attention(q, k, v)
    torch.testing.assert_close(out, _naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (op, reason)
        ops.bidirectional_attention(q, k, v)
    # backend= is strict: an explicit kernel backend that cannot take the head dim raises
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs.*head_dim 16"):
        ops.bidirectional_attention(q, k, v, backend="triton")


def test_auto_decode_falls_back_on_an_unsupported_head_dim_with_one_warning():
    from hybridkernels import _cuda

    if not _cuda.available():
        pytest.skip("_C not importable")
    q = torch.randn(1, 2, 16)
    kc = torch.randn(1, 4, 2, 16)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="decode_attention.*head_dim.*16"):
        ops.decode_attention(q, kc, kc, lens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.decode_attention(q, kc, kc, lens)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_executor_runs_any_head_dim_and_matches_hf(D):
    hf = hf_model(head_dim=D)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = ARExecutor.from_hf(hf).generate(ids, mask, max_new_tokens=6)
    assert torch.equal(out.tokens, ref[:, 6:])


def test_info_names_the_kernel_head_dims(capsys):
    from hybridkernels import cli

    cli.main(["info"])
    text = capsys.readouterr().out
    assert "head_dim" in text and str(ops.HEAD_DIMS) in text and "reference" in text
