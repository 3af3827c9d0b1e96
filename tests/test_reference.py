"""The reference ops (the spec) against independent computations: SDPA with explicit masks,
plain indexing, and a hand-written LLaDA top-k commit."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridkernels import reference


def _sdpa(q, k, v, visible, scale=None):
    """SDPA in [B, H, L, D] layout with an explicit bool mask [B, 1|H, Lq, Lk] and repeated KV."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale).transpose(1, 2)


def _left_padding_mask(lengths, Lk):
    return torch.arange(Lk)[None, :] >= (Lk - torch.tensor(lengths))[:, None]


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 7), (5, 13), (33, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_bidirectional_matches_sdpa(Hq, Hkv, Lq, Lk, causal):
    g = torch.Generator().manual_seed(Lq * 100 + Lk)
    B, D = 3, 16
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k = torch.randn(B, Lk, Hkv, D, generator=g)
    v = torch.randn(B, Lk, Hkv, D, generator=g)
    # Left padding, keeping the last key of every row visible so no causal row is empty.
    pad = _left_padding_mask([Lk, max(1, Lk // 2), 1], Lk)
    out, lse = reference.bidirectional_attention(
        q, k, v, key_padding_mask=pad, causal=causal, scale=0.3, return_lse=True
    )
    visible = pad[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    has_key = visible.any(-1)  # [B, 1, Lq]
    expected = _sdpa(q, k, v, visible, scale=0.3).float()
    rows = has_key[:, 0, :, None, None].expand_as(out)
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert torch.all(out[~rows] == 0)

    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(Hq // Hkv, 2)) * 0.3
    expected_lse = scores.masked_fill(~visible, -math.inf).logsumexp(-1).float()
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_fully_masked_rows_give_zero_and_neg_inf_lse():
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    pad = torch.tensor([[False] * 5, [True] * 5])
    out, lse = reference.bidirectional_attention(q, k, v, key_padding_mask=pad, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_bidirectional_keeps_dtype_and_is_order_free():
    q = torch.randn(1, 4, 2, 32, dtype=torch.float16)
    k = torch.randn(1, 9, 2, 32, dtype=torch.float16)
    v = torch.randn(1, 9, 2, 32, dtype=torch.float16)
    out = reference.bidirectional_attention(q, k, v)
    assert out.dtype == torch.float16
    perm = torch.randperm(9)
    torch.testing.assert_close(out, reference.bidirectional_attention(q, k[:, perm], v[:, perm]))


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_decode_attention_matches_a_loop_over_rows(prefix_len):
    g = torch.Generator().manual_seed(prefix_len)
    B, Hq, Hkv, D, Lmax = 3, 8, 2, 16, 11
    q = torch.randn(B, Hq, D, generator=g)
    kc, vc = torch.randn(B, Lmax, Hkv, D, generator=g), torch.randn(B, Lmax, Hkv, D, generator=g)
    kp, vp = torch.randn(5, Hkv, D, generator=g), torch.randn(5, Hkv, D, generator=g)
    lens = torch.tensor([1, 11, 6], dtype=torch.int32)
    prefix = (kp, vp, prefix_len) if prefix_len else None
    out, lse = reference.decode_attention(q, kc, vc, lens, prefix=prefix, return_lse=True)
    for b in range(B):
        keys = torch.cat([kp[:prefix_len], kc[b, : lens[b]]])[None]
        vals = torch.cat([vp[:prefix_len], vc[b, : lens[b]]])[None]
        visible = torch.ones(1, 1, 1, keys.shape[1], dtype=torch.bool)
        expected = _sdpa(q[b, None, None], keys, vals, visible)[0, 0].float()
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)
    assert lse.shape == (B, Hq)


def test_kv_append_matches_plain_indexing():
    B, Lmax, H, D, T = 3, 10, 2, 4, 3
    kc, vc = torch.zeros(B, Lmax, H, D), torch.zeros(B, Lmax, H, D)
    kn, vn = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    pos = torch.tensor([0, 7, 2])
    reference.kv_append(kc, vc, kn, vn, pos)
    ek, ev = torch.zeros_like(kc), torch.zeros_like(vc)
    for b in range(B):
        for t in range(T):
            ek[b, pos[b] + t], ev[b, pos[b] + t] = kn[b, t], vn[b, t]
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


def test_get_num_transfer_tokens_is_llada_split():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :7] = True
    out = reference.get_num_transfer_tokens(mask, steps=4)
    assert out.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]
    assert out.sum(1).tolist() == [10, 7, 0]


def _llada_commit(x, logits, mask_id, num_transfer):
    """LLaDA's low-confidence step, written the way its generate() does it (distinct confidences)."""
    x = x.clone()
    mask_index = x == mask_id
    x0 = logits.argmax(-1)
    p = torch.softmax(logits.double(), -1)
    x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(x.shape[0]):
        _, idx = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer[j, idx] = True
    x[transfer] = x0[transfer]
    return x, transfer


def test_unmask_low_confidence_matches_hand_written_llada():
    g = torch.Generator().manual_seed(0)
    B, L, V, mask_id = 4, 12, 17, 16
    x = torch.randint(0, 16, (B, L), generator=g)
    x[torch.rand(B, L, generator=g) < 0.6] = mask_id
    x[3] = mask_id
    logits = torch.randn(B, L, V, generator=g) * 3
    masked = (x == mask_id).sum(1)
    num_transfer = torch.minimum(masked, torch.tensor([2, 0, 5, 12]))
    expected_x, expected_transfer = _llada_commit(x, logits, mask_id, num_transfer)
    res = reference.unmask_step(x, logits=logits, mask_id=mask_id, num_transfer=num_transfer)
    assert torch.equal(res.x, expected_x) and torch.equal(res.committed, expected_transfer)
    assert res.x is x  # in place
    assert torch.all(res.confidence[~(expected_x == mask_id) & ~res.committed] == -math.inf)


def test_unmask_ties_go_to_lowest_position_and_window_offset():
    mask_id = 3
    x = torch.tensor([[0, 3, 3, 3, 3, 1]])
    logits = torch.zeros(1, 4, 4)
    logits[0, :, 2] = 5.0  # identical rows -> identical confidence
    res = reference.unmask_step(x, logits=logits, mask_id=mask_id, start=1, num_transfer=torch.tensor([2]))
    assert res.committed.tolist() == [[True, True, False, False]]
    assert x.tolist() == [[0, 2, 2, 3, 3, 1]]


def test_unmask_threshold_commits_confident_rows_and_at_least_one():
    mask_id = 9
    x = torch.full((2, 4), mask_id)
    x[1, :] = 1  # nothing left to commit in row 1
    logits = torch.full((2, 4, 10), -10.0)
    logits[0, 0, 3:5] = 0.0  # row 0: confidence ~0.5; row 1: 0.1
    logits[0, 2, 5], logits[0, 3, 6] = 10.0, 10.0  # rows 2, 3 confident
    res = reference.unmask_step(x.clone(), logits=logits, mask_id=mask_id, threshold=0.9)
    assert res.committed.tolist() == [[False, False, True, True], [False] * 4]
    res = reference.unmask_step(x.clone(), logits=logits, mask_id=mask_id, threshold=1.01)  # nothing passes
    assert res.committed.tolist() == [[False, False, True, False], [False] * 4]  # the first of a tie


def test_unmask_banned_and_deferred_tokens():
    mask_id = 7
    x = torch.full((1, 3), mask_id)
    logits = torch.zeros(1, 3, 8)
    logits[0, :, 5] = 4.0
    logits[0, 1, 6] = 9.0  # row 1's argmax is 6
    res = reference.unmask_step(
        x.clone(), logits=logits, mask_id=mask_id, num_transfer=torch.tensor([3]), banned_token_ids=[5]
    )
    assert 5 not in res.tokens.tolist()[0]
    res = reference.unmask_step(
        x.clone(), logits=logits, mask_id=mask_id, num_transfer=torch.tensor([1]), deferred_token_ids=[6]
    )
    assert res.confidence[0, 1] == -math.inf and res.committed.tolist() == [[True, False, False]]


def test_unmask_fused_form_equals_logits_form():
    g = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    x = torch.full((2, 5), 10)
    a = reference.unmask_step(
        x.clone(), hidden=hidden, lm_head=head, mask_id=10, num_transfer=torch.tensor([2, 3])
    )
    b = reference.unmask_step(
        x.clone(), logits=hidden @ head.T, mask_id=10, num_transfer=torch.tensor([2, 3])
    )
    assert torch.equal(a.x, b.x) and torch.equal(a.committed, b.committed)


def test_unmask_sampling_follows_softmax_over_temperature():
    """Gumbel-max at temperature T samples softmax(logits / T): a chi-square test, alpha = 1e-4."""
    torch.manual_seed(0)
    V, n, T = 5, 20000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    x = torch.full((n, 1), V - 1)
    logits_b = logits.expand(n, 1, V).clone()
    logits_b[..., V - 1] = -math.inf  # the mask token itself is never a candidate
    g = torch.Generator().manual_seed(123)
    res = reference.unmask_step(
        x,
        logits=logits_b,
        mask_id=V - 1,
        num_transfer=torch.ones(n, dtype=torch.long),
        temperature=T,
        generator=g,
    )
    counts = torch.bincount(res.tokens[:, 0], minlength=V)[: V - 1].double()
    expected = torch.softmax(logits[: V - 1] / T, 0).double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 21.1, chi2  # chi-square critical value, 3 degrees of freedom, alpha = 1e-4


def test_unmask_random_remasking_uses_uniform_confidence():
    x = torch.full((1, 6), 4)
    logits = torch.zeros(1, 6, 5)
    res = reference.unmask_step(
        x,
        logits=logits,
        mask_id=4,
        num_transfer=torch.tensor([2]),
        remasking="random",
        generator=torch.Generator().manual_seed(0),
    )
    assert res.committed.sum() == 2
    assert ((res.confidence >= 0) & (res.confidence < 1)).all()


def test_padded_slots_holding_nan_do_not_leak():
    q, k, v = torch.randn(1, 2, 2, 32), torch.randn(1, 6, 2, 32), torch.randn(1, 6, 2, 32)
    pad = torch.tensor([[True, True, True, False, False, False]])
    clean = reference.bidirectional_attention(q, k, v, key_padding_mask=pad)
    k[:, 3:], v[:, 3:] = float("nan"), float("nan")
    assert torch.equal(reference.bidirectional_attention(q, k, v, key_padding_mask=pad), clean)
    lens = torch.tensor([3], dtype=torch.int32)
    out = reference.decode_attention(q[:, 0], k, v, lens)
    assert torch.isfinite(out).all()
