"""Bad input to every op gives a ValueError/TypeError naming the argument; backend selection."""

import pytest
import torch

from hybridkernels import ops
from hybridkernels.ops._dispatch import choose_backend


def _qkv(B=2, Lq=4, Lk=6, Hq=4, Hkv=2, D=32, dtype=torch.float32):
    return (
        torch.randn(B, Lq, Hq, D, dtype=dtype),
        torch.randn(B, Lk, Hkv, D, dtype=dtype),
        torch.randn(B, Lk, Hkv, D, dtype=dtype),
    )


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q must have dtype"),
        (lambda q, k, v: (q, k.half(), v, {}), TypeError, "k has dtype torch.float16 but q"),
        (lambda q, k, v: (q, k, v.double(), {}), TypeError, "v must have dtype"),
        (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dims"),
        (
            lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), {}),
            ValueError,
            "multiple of k/v heads",
        ),
        (lambda q, k, v: (q, k, v[:, :5], {}), ValueError, "v must have shape"),
        # issue 16: any head_dim >= 1 runs (tests/test_head_dims.py); 0 is refused
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0], {}), ValueError, "head_dim must be >= 1"),
        (lambda q, k, v: (torch.cat([q, q], 1), k, v, {}), ValueError, "Lq \\(8\\) must be <= Lk \\(6\\)"),
        (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 6)}), TypeError, "key_padding_mask"),
        (
            lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}),
            ValueError,
            "key_padding_mask must have shape",
        ),
        (
            lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, {}),
            ValueError,
            "contiguous last dimension",
        ),
        (lambda q, k, v: (q, k.to("meta"), v, {}), ValueError, "k is on meta"),
        (lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale"),
        (lambda q, k, v: ("q", k, v, {}), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bidirectional_attention_bad_input(make, exc, words):
    q, k, v, kw = make(*_qkv())
    with pytest.raises(exc, match=words):
        ops.bidirectional_attention(q, k, v, **kw)


def _decode_inputs(B=2, Hq=4, Hkv=2, D=32, Lmax=8):
    return (
        torch.randn(B, Hq, D),
        torch.randn(B, Lmax, Hkv, D),
        torch.randn(B, Lmax, Hkv, D),
        torch.tensor([3, 8], dtype=torch.int32),
    )


def test_decode_attention_bad_input():
    q, kc, vc, lens = _decode_inputs()
    with pytest.raises(TypeError, match="cache_lens must have dtype"):
        ops.decode_attention(q, kc, vc, lens.long())
    with pytest.raises(TypeError, match="k_cache has dtype torch.float16 but q"):
        ops.decode_attention(q, kc.half(), vc.half(), lens)
    with pytest.raises(ValueError, match=r"cache_lens\[1\] = 9"):
        ops.decode_attention(q, kc, vc, torch.tensor([3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one key"):
        ops.decode_attention(q, kc, vc, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of cache heads"):
        ops.decode_attention(torch.randn(2, 3, 32), kc, vc, lens)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        ops.decode_attention(q, kc[..., :16], vc, lens)
    kp = torch.randn(4, 2, 32)
    with pytest.raises(ValueError, match="prefix_len = 5"):
        ops.decode_attention(q, kc, vc, lens, prefix=(kp, kp, 5))
    with pytest.raises(TypeError, match="prefix must be a tuple"):
        ops.decode_attention(q, kc, vc, lens, prefix=kp)
    # A zero-length row is fine when a non-empty prefix precedes it.
    out = ops.decode_attention(q, kc, vc, torch.tensor([0, 2], dtype=torch.int32), prefix=(kp, kp, 2))
    assert torch.isfinite(out).all()


def test_kv_append_bad_input():
    kc, vc = torch.zeros(2, 8, 2, 4), torch.zeros(2, 8, 2, 4)
    kn, vn = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    pos = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"positions\[1\] = 6 with T = 3"):
        ops.kv_append(kc, vc, kn, vn, torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"positions\[0\] = -1"):
        ops.kv_append(kc, vc, kn, vn, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="k_new has dtype torch.float16"):
        ops.kv_append(kc, vc, kn.half(), vn.half(), pos)
    with pytest.raises(TypeError, match="positions must have dtype"):
        ops.kv_append(kc, vc, kn, vn, pos.float())
    with pytest.raises(ValueError, match="k_new must have shape"):
        ops.kv_append(kc, vc, kn[:, :, :1], vn, pos)
    with pytest.raises(ValueError, match="T = 9 new tokens"):
        ops.kv_append(kc, vc, torch.zeros(2, 9, 2, 4), torch.zeros(2, 9, 2, 4), pos)
    assert kc.abs().sum() == 0  # nothing was written by the failed calls


def test_unmask_step_bad_input():
    x = torch.full((2, 6), 9)
    logits = torch.randn(2, 6, 10)
    nt = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="mask_id = 10"):
        ops.unmask_step(x, logits=logits, mask_id=10, num_transfer=nt)
    with pytest.raises(ValueError, match="exactly one of num_transfer and threshold"):
        ops.unmask_step(x, logits=logits, mask_id=9)
    with pytest.raises(ValueError, match="exactly one of num_transfer and threshold"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, threshold=0.5)
    with pytest.raises(ValueError, match="either logits or hidden"):
        ops.unmask_step(x, mask_id=9, num_transfer=nt)
    with pytest.raises(ValueError, match="not both"):
        ops.unmask_step(
            x,
            logits=logits,
            hidden=torch.randn(2, 6, 4),
            lm_head=torch.randn(10, 4),
            mask_id=9,
            num_transfer=nt,
        )
    with pytest.raises(ValueError, match="lm_head is"):
        ops.unmask_step(
            x, hidden=torch.randn(2, 6, 4), lm_head=torch.randn(10, 5), mask_id=9, num_transfer=nt
        )
    with pytest.raises(ValueError, match=r"num_transfer\[1\] = -1"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=torch.tensor([1, -1]))
    x2 = x.clone()
    x2[0, :4] = 1
    with pytest.raises(ValueError, match=r"num_transfer\[0\] = 3 but sequence 0 has 2 masked"):
        ops.unmask_step(x2, logits=logits, mask_id=9, num_transfer=3)
    with pytest.raises(ValueError, match="start = 1"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, start=1)
    with pytest.raises(ValueError, match="temperature"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, temperature=-1.0)
    with pytest.raises(ValueError, match="remasking"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, remasking="top")
    with pytest.raises(ValueError, match=r"banned_token_ids\[0\] = 12"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, banned_token_ids=[12])
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.unmask_step(x.int(), logits=logits, mask_id=9, num_transfer=nt)
    with pytest.raises(ValueError, match="seed or generator"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, seed=1, generator=torch.Generator())
    assert torch.all(x == 9)  # failed calls leave x untouched


def test_unmask_step_seed_is_deterministic():
    logits = torch.randn(3, 8, 50)
    runs = [
        ops.unmask_step(
            torch.full((3, 8), 49), logits=logits, mask_id=49, num_transfer=2, temperature=1.0, seed=7
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].x, runs[1].x)


def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
    monkeypatch.delenv("HYBRIDKERNELS_BACKEND", raising=False)
    assert choose_backend("op", None, cpu, ("reference", "triton"), auto) == "reference"
    assert choose_backend("op", "reference", cpu, ("reference",), auto) == "reference"
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        choose_backend("op", "fast", cpu, ("reference",), auto)
    with pytest.raises(ValueError, match="op has no cuda implementation"):
        choose_backend("op", "cuda", cpu, ("reference",), auto)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        choose_backend("op", "triton", cpu, ("reference", "triton"), auto)
    monkeypatch.setenv("HYBRIDKERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="HYBRIDKERNELS_BACKEND=triton cannot run"):
        choose_backend("op", None, cpu, ("reference", "triton"), auto)
    # The variable is global: an op without that backend ignores it.
    assert choose_backend("op", None, cpu, ("reference",), auto) == "reference"
    monkeypatch.setenv("HYBRIDKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="HYBRIDKERNELS_BACKEND='nope'"):
        choose_backend("op", None, cpu, ("reference",), auto)
    monkeypatch.setenv("HYBRIDKERNELS_BACKEND", "auto")
    assert choose_backend("op", None, cuda, ("reference",), auto) == "reference"


def test_kv_append_backends_agree():
    kc = torch.zeros(2, 8, 2, 4, dtype=torch.bfloat16)
    kn = torch.randn(2, 2, 2, 4, dtype=torch.bfloat16)
    pos = torch.tensor([1, 6])
    a, b = kc.clone(), kc.clone()
    ops.kv_append(a, a.clone(), kn, kn, pos, backend="cuda")
    ops.kv_append(b, b.clone(), kn, kn, pos, backend="reference")
    assert torch.equal(a, b)
